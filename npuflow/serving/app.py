"""Serving: registry versions behind an OpenAI API, the champion and one challenger by weighted routing.

A `ModelPool` resolves the registry aliases (`champion`, and `candidate` as the challenger when it is another
version), loads each version's quantized weights from the artifact store, and picks a version per request
by weight. `create_app(pool)` is the FastAPI app around it:

  POST /v1/completions   OpenAI completions (prompt: str, max_tokens, temperature, top_p, seed, stream)
  GET  /v1/models        the model ids a request may name: NAME (weighted), NAME@champion, NAME@challenger
  GET  /health           versions served, weights, why a challenger is out of rotation (no auth)
  GET  /metrics          Prometheus text, labelled per model version (no auth)
  POST /admin/weights    {"champion": 90, "challenger": 10}: relative routing weights, >= 0
  POST /admin/reload     re-resolve the aliases (after a promotion or a rollback) and load what changed

Guarantees: the champion is never dropped to load a challenger (a new champion is loaded beside the old
one and swapped in; if it fails the old one keeps serving); a challenger that fails to load or to answer
is taken out of rotation (weight 0, the reason in /health) and its request is answered by the champion.
Inference runs in a worker thread with one lock per model, so the event loop keeps answering.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from pydantic import ValidationError

from npuflow.core.errors import NpuflowError
from npuflow.core.names import Alias, Role
from npuflow.serving.generation import Sampling, _Run
from npuflow.serving.loading import LoadedModel
from npuflow.serving.metrics import _Metrics
from npuflow.serving.pool import ModelPool
from npuflow.serving.protocol import (
    UNSUPPORTED,
    ApiError,
    CompletionRequest,
    WeightsRequest,
    _chunk,
    _validation_message,
)

log = logging.getLogger("npuflow.serve")


# ---- one loaded version ---------------------------------------------------------------------------


# ---- generation (runs in a worker thread) ----------------------------------------------------------


# ---- the pool: which versions serve, with what weight ------------------------------------------------


# ---- HTTP ------------------------------------------------------------------------------------------


class _VersionHeader:
    """ASGI middleware: every response carries x-model-version (the champion's when no route chose one)."""

    def __init__(self, app, pool: ModelPool):
        self.app, self.pool = app, pool

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-model-version" for k, _ in headers):
                    m = self.pool.champion.model
                    headers.append((b"x-model-version", (m.label if m else "none").encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def create_app(pool: ModelPool) -> FastAPI:
    """The HTTP API around a pool (load it first with pool.reload(), or the app's startup does)."""
    opts, name = pool.opts, pool.opts.name
    metrics = _Metrics()
    pool.on_change = lambda: metrics.served(name, pool)

    @asynccontextmanager
    async def lifespan(_app):
        if pool.champion.model is None:
            await run_in_threadpool(pool.reload)
        metrics.served(name, pool)
        yield

    app = FastAPI(title=f"npuflow serve: {name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_VersionHeader, pool=pool)
    app.state.pool, app.state.metrics = pool, metrics

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(404)
    @app.exception_handler(405)
    async def _http_error(request: Request, err: Exception):
        status = getattr(err, "status_code", 404)
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {getattr(err, 'detail', err)}"
        return ApiError(status, message, kind).response()

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, err: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(err).__name__}", "server_error").response()

    def authorize(request: Request) -> None:
        if opts.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), opts.token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send `Authorization: Bearer <token>`",
                           "authentication_error")

    async def json_body(request: Request) -> dict[str, Any]:
        limit = opts.max_body_bytes
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
            raise ApiError(400, f"the body is not valid JSON: {err}", "invalid_request_error") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_request_error")
        return data

    def parse(data: dict[str, Any]) -> tuple[CompletionRequest, Role | None]:
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as err:
            msg, param = _validation_message(err)
            raise ApiError(400, msg, "invalid_request_error", param) from None
        for key, neutral in UNSUPPORTED.items():
            if key in data and data[key] != neutral and not (neutral is None and data[key] in ({}, [])):
                raise ApiError(400, f"{key} is not supported by this server (only {json.dumps(neutral)})",
                               "invalid_request_error", key)
        if req.max_tokens > opts.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be 1..{opts.max_tokens_limit}, got {req.max_tokens}",
                           "invalid_request_error", "max_tokens")
        pins: dict[str, Role | None] = {name: None, f"{name}@{Alias.CHAMPION}": Role.CHAMPION,
                                        f"{name}@{Role.CHALLENGER}": Role.CHALLENGER,
                                        f"{name}@{opts.challenger_alias}": Role.CHALLENGER}
        if req.model not in pins:
            raise ApiError(404, f"model {req.model!r} is not served here; valid: {', '.join(pins)}",
                           "not_found_error", "model")
        return req, pins[req.model]

    def prompt_ids(lm: LoadedModel, req: CompletionRequest) -> list[int]:
        with lm.tok_lock:  # microseconds: fine on the event loop
            ids = lm.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", "invalid_request_error", "prompt")
        if len(ids) + req.max_tokens > lm.context:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                           f"model's context of {lm.context} tokens", "invalid_request_error", "max_tokens")
        return ids

    async def start(req: CompletionRequest, pin: Role | None, s: Sampling, t0: float):
        """Route the request and wait for its first event; a challenger that fails to answer is taken out of
        rotation and (unless the request pinned it) the champion answers instead.
        Returns (role, model, run, first event); the caller releases the model."""
        role, lm = pool.acquire(pin)
        metrics.requests.labels(name, lm.label).inc()
        run = None
        try:
            slow = opts.challenger_slowdown_ms / 1000 if role == Role.CHALLENGER else 0.0
            run = _Run(lm, prompt_ids(lm, req), s, metrics, name, t0, slow)
            first = await run.next()
        except BaseException as err:
            if run is not None:
                run.cancel.set()
            pool.release(lm)
            if isinstance(err, ApiError):
                metrics.errors.labels(name, lm.label, err.type).inc()
            raise
        if first[0] == "error" and role == Role.CHALLENGER:
            metrics.errors.labels(name, lm.label, "model_error").inc()
            pool.release(lm)
            pool.take_out(lm, f"failed to answer: {first[1]}")
            if pin is None:
                return await start(req, Role.CHAMPION, s, t0)
        return role, lm, run, first

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            authorize(request)
            req, pin = parse(await json_body(request))
        except ApiError as err:
            metrics.errors.labels(name, "none", err.type).inc()
            raise
        sampling = Sampling(req.max_tokens, req.temperature, req.top_p, req.seed)
        role, lm, run, first = await start(req, pin, sampling, t0)
        headers = {"x-model-version": lm.label, "x-model-role": role}
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if first[0] == "error":
            if role == Role.CHAMPION:  # a pinned challenger was released (and taken out) in start()
                pool.release(lm)
            metrics.errors.labels(name, lm.label, "server_error").inc()
            err = ApiError(500, f"version {lm.label} failed to answer: {first[1]}", "server_error")
            return err.response(headers)
        if not req.stream:
            text, event = [], first
            try:
                while event[0] == "token":
                    text.append(event[1])
                    event = await run.next()
            finally:
                run.cancel.set()  # the client went away: stop generating at the next token
                pool.release(lm)
            if event[0] == "error":
                metrics.errors.labels(name, lm.label, "server_error").inc()
                return ApiError(500, f"version {lm.label} failed mid-answer: {event[1]}",
                                "server_error").response(headers)
            n_in, n_out = len(run.prompt_ids), run.completion_tokens
            return JSONResponse({
                "id": cid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": f"{name}/v{lm.label}",
                "choices": [{"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": event[1]}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            }, headers=headers)

        async def sse() -> AsyncIterator[str]:
            event = first
            try:
                while event[0] == "token":
                    if event[1]:
                        yield _chunk(cid, created, req.model, event[1], None)
                    event = await run.next()
                if event[0] == "error":
                    metrics.errors.labels(name, lm.label, "server_error").inc()
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                    return
                yield _chunk(cid, created, req.model, "", event[1])
                yield "data: [DONE]\n\n"
            finally:
                run.cancel.set()  # the client went away: stop generating at the next token
                pool.release(lm)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        ids = [name, f"{name}@{Alias.CHAMPION}"]
        ids += [f"{name}@{Role.CHALLENGER}"] if pool.challenger.model else []
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "npuflow"} for i in ids]}

    @app.get("/health")
    async def health():
        return pool.health()

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/weights")
    async def weights(request: Request):
        authorize(request)
        try:
            w = WeightsRequest.model_validate(await json_body(request))
        except ValidationError as err:
            msg, param = _validation_message(err)
            raise ApiError(400, msg, "invalid_request_error", param) from None
        new = {**pool.weights, **w.model_dump(exclude_none=True)}
        if new[Role.CHAMPION] + new[Role.CHALLENGER] <= 0:
            raise ApiError(400, "at least one weight must be > 0", "invalid_request_error")
        pool.set_weights(new)
        h = pool.health()
        note = None
        if new[Role.CHALLENGER] > 0 and pool.challenger.model is None:
            reason = pool.challenger.reason or "no challenger version"
            note = f"the challenger is not in rotation ({reason}): its weight applies after a good reload"
        return {"weights": h["weights"], "requested": pool.weights, "note": note}

    @app.post("/admin/reload")
    async def reload(request: Request):
        authorize(request)
        try:
            state = await run_in_threadpool(pool.reload)
        except NpuflowError as err:  # only when nothing was served before: keep answering anyway
            raise ApiError(503, str(err), "reload_failed") from None
        if state["errors"] and pool.champion.reason:
            raise ApiError(500, "; ".join(state["errors"]), "reload_failed")
        return state

    return app


def run_server(pool: ModelPool, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve until interrupted (the pool is loaded before the socket opens)."""
    import uvicorn

    uvicorn.run(create_app(pool), host=host, port=port, log_level=log_level, access_log=False)
