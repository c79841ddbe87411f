"""The HTTP routes: a few lines each on an APIRouter, parsing HTTP and calling the serving objects that
create_app puts on `app.state` (completions, pool, metrics, opts)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from npuflow.core.errors import NpuflowError
from npuflow.core.names import Alias, Role
from npuflow.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    WeightsRequest,
    bad_request,
    validation_message,
)

router = APIRouter()
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


def authorize(request: Request) -> None:
    token = request.app.state.opts.token
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`",
                       "authentication_error")


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, refused (413) past the size limit before it is all read."""
    limit = request.app.state.opts.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"request body over {limit} bytes", "invalid_request_error")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body over {limit} bytes", "invalid_request_error")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


async def _answer(request: Request, kind: type) -> Any:
    """Parse, then create the answer; a client that disconnects stops its generation (non-streaming
    requests too: the handler is cancelled, which cancels the run and frees its slot at the next step)."""
    t0 = time.perf_counter()
    serving = request.app.state.completions
    try:
        authorize(request)
        req, pin = serving.parse(await json_body(request), kind)
    except ApiError as err:
        serving.metrics.errors.labels(serving.name, "none", err.type).inc()
        raise
    work = asyncio.ensure_future(serving.create(req, pin, t0))
    if req.stream:
        return await work  # StreamingResponse: Starlette stops the generator when the client leaves
    while True:
        done, _ = await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            return Response(status_code=499)  # nobody reads it


@router.post("/v1/completions")
async def completions(request: Request):
    return await _answer(request, CompletionRequest)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _answer(request, ChatCompletionRequest)


def _cards(request: Request) -> dict[str, ModelCard]:
    name, pool = request.app.state.opts.name, request.app.state.pool
    cards = {}
    for model_id, role in ((name, Role.CHAMPION), (f"{name}@{Alias.CHAMPION}", Role.CHAMPION),
                           (f"{name}@{Role.CHALLENGER}", Role.CHALLENGER)):
        lm = pool.champion.model if role == Role.CHAMPION else pool.challenger.model
        if lm is not None:
            cards[model_id] = ModelCard(id=model_id, created=lm.version.created_s or lm.loaded_s,
                                        max_model_len=lm.context)
    return cards


@router.get("/v1/models")
async def models(request: Request):
    authorize(request)
    return {"object": "list", "data": [c.model_dump() for c in _cards(request).values()]}


@router.get("/v1/models/{model_id}")
async def model(request: Request, model_id: str):
    authorize(request)
    cards = _cards(request)
    if model_id not in cards:
        raise ApiError(404, f"model {model_id!r} is not served here; valid: {', '.join(cards)}", "not_found_error",
                       "model")
    return cards[model_id].model_dump()


@router.get("/health")
async def health(request: Request):
    return request.app.state.pool.health()


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/weights")
async def weights(request: Request):
    authorize(request)
    pool = request.app.state.pool
    try:
        w = WeightsRequest.model_validate(await json_body(request))
    except ValidationError as err:
        raise bad_request(*validation_message(err)) from None
    try:  # merged over the current weights in the pool, after any lease that lapsed has returned its traffic
        new = pool.set_weights(w.model_dump(exclude_none=True, exclude={"lease_s"}), lease_s=w.lease_s)
    except ValueError as err:
        raise bad_request(str(err)) from None
    note = None
    if new[Role.CHALLENGER] > 0 and pool.challenger.model is None:
        reason = pool.challenger.reason or "no challenger version"
        note = f"the challenger is not in rotation ({reason}): its weight applies after a good reload"
    h = pool.health()
    return {"weights": h["weights"], "requested": new, "lease": h["weights_lease"], "note": note}


@router.post("/admin/reload")
async def reload(request: Request):
    authorize(request)
    pool = request.app.state.pool
    try:
        state = await run_in_threadpool(pool.reload)
    except NpuflowError as err:  # only when nothing was served before: keep answering anyway
        raise ApiError(503, str(err), "reload_failed") from None
    if state["errors"] and pool.champion.reason:
        raise ApiError(500, "; ".join(state["errors"]), "reload_failed")
    return state
