"""The HTTP routes: a few lines each on an APIRouter, parsing HTTP and calling the serving objects that
create_app puts on `app.state` (completions, pool, metrics, opts)."""

from __future__ import annotations

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
from npuflow.serving.protocol import ApiError, WeightsRequest, bad_request, validation_message

router = APIRouter()


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


@router.post("/v1/completions")
async def completions(request: Request):
    t0 = time.perf_counter()
    serving = request.app.state.completions
    try:
        authorize(request)
        req, pin = serving.parse(await json_body(request))
    except ApiError as err:
        serving.metrics.errors.labels(serving.name, "none", err.type).inc()
        raise
    return await serving.create(req, pin, t0)


@router.get("/v1/models")
async def models(request: Request):
    authorize(request)
    name, pool = request.app.state.opts.name, request.app.state.pool
    ids = [name, f"{name}@{Alias.CHAMPION}"] + ([f"{name}@{Role.CHALLENGER}"] if pool.challenger.model else [])
    return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "npuflow"} for i in ids]}


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
    new = {**pool.weights, **w.model_dump(exclude_none=True)}
    if new[Role.CHAMPION] + new[Role.CHALLENGER] <= 0:
        raise bad_request("at least one weight must be > 0")
    pool.set_weights(new)
    note = None
    if new[Role.CHALLENGER] > 0 and pool.challenger.model is None:
        reason = pool.challenger.reason or "no challenger version"
        note = f"the challenger is not in rotation ({reason}): its weight applies after a good reload"
    return {"weights": pool.health()["weights"], "requested": pool.weights, "note": note}


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
