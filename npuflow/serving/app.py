"""Serving: registry versions behind an OpenAI API, the champion and one challenger by weighted routing.

A `ModelPool` resolves the registry aliases (`champion`, and `candidate` as the challenger when it is another
version), loads each version's quantized weights from the artifact store, and picks a version per request
by weight. `create_app(pool)` is the FastAPI app around it
(routes in npuflow.serving.routes, completions in npuflow.serving.completions):

  POST /v1/completions        OpenAI completions (prompt: text or token ids, max_tokens, temperature, top_p,
                              seed, stop, stream, stream_options)
  POST /v1/chat/completions   OpenAI chat (messages through the tokenizer's chat template; the same options)
  GET  /v1/models[/{id}]      the model ids a request may name: NAME (weighted), NAME@champion, NAME@challenger
  GET  /health           versions served, weights, why a challenger is out of rotation (no auth)
  GET  /metrics          Prometheus text, labelled per model version (no auth)
  POST /admin/weights    {"champion": 90, "challenger": 10}: relative routing weights, >= 0; with
                         "lease_s": 60 the challenger's weight is a lease: unless posted again within 60 s
                         it returns to 0 (all traffic to the champion; "canary weight lease expired" in
                         /health). The staged rollout always leases and renews; without lease_s the weights
                         stand until changed
  POST /admin/reload     re-resolve the aliases (after a promotion or a rollback) and load what changed

Guarantees: the champion is never dropped to load a challenger (a new champion is loaded beside the old
one and swapped in; if it fails the old one keeps serving); a challenger that fails to load or to answer
is taken out of rotation (weight 0, the reason in /health) and its request is answered by the champion.
Every version's engine is stepped by one engine thread with continuous batching (npuflow.serving.generation),
so the event loop keeps answering; or, for a release whose deployable names engine vllm, in a vLLM child
process group (npuflow.serving.remote) that the router streams from, with the same routing, headers
and metrics. Shutdown stops every engine.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from npuflow.serving.completions import ServingCompletions
from npuflow.serving.metrics import ServeMetrics
from npuflow.serving.pool import ModelPool
from npuflow.serving.protocol import ApiError
from npuflow.serving.routes import router

log = logging.getLogger("npuflow.serve")


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
    metrics = ServeMetrics()
    pool.on_change = lambda: metrics.served(name, pool)

    @asynccontextmanager
    async def lifespan(_app):
        if pool.champion.model is None:
            await run_in_threadpool(pool.reload)
        metrics.served(name, pool)
        try:
            yield
        finally:  # shutdown (SIGTERM/SIGINT of `npuflow serve` included): no engine outlives the server
            await run_in_threadpool(pool.close)

    app = FastAPI(title=f"npuflow serve: {name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_VersionHeader, pool=pool)
    app.state.pool, app.state.metrics, app.state.opts = pool, metrics, opts
    app.state.completions = ServingCompletions(pool, metrics, opts)
    app.include_router(router)
    _error_handlers(app)
    return app


def _error_handlers(app: FastAPI) -> None:
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


def run_server(pool: ModelPool, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve until interrupted (the pool is loaded before the socket opens); every engine is stopped after."""
    import uvicorn

    try:
        uvicorn.run(create_app(pool), host=host, port=port, log_level=log_level, access_log=False)
    finally:  # also when the socket never opened (the lifespan's shutdown did not run)
        pool.close()
