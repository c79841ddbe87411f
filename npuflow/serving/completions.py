"""OpenAI completions over the pool: validate, route, generate, answer (JSON or server-sent events).

`ServingCompletions` is handed the pool, its metrics and the options, like vLLM's
OpenAIServingCompletion: the routes only parse HTTP and call it, so it is testable without a server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from npuflow.core.names import Alias, Role
from npuflow.runtime.engine import SamplingParams
from npuflow.serving.generation import _Run
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.metrics import ServeMetrics
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool
from npuflow.serving.protocol import (
    SSE_DONE,
    UNSUPPORTED,
    ApiError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    bad_request,
    sse,
    validation_message,
)


class ServingCompletions:
    """POST /v1/completions for one model line: the champion and at most one challenger."""

    def __init__(self, pool: ModelPool, metrics: ServeMetrics, opts: ServeOptions):
        self.pool, self.metrics, self.opts, self.name = pool, metrics, opts, opts.name

    def model_ids(self) -> dict[str, Role | None]:
        """The ids a request may name -> the role it pins (None: weighted routing)."""
        name = self.name
        return {name: None, f"{name}@{Alias.CHAMPION}": Role.CHAMPION, f"{name}@{Role.CHALLENGER}": Role.CHALLENGER,
                f"{name}@{self.opts.challenger_alias}": Role.CHALLENGER}

    def parse(self, data: dict[str, Any]) -> tuple[CompletionRequest, Role | None]:
        """The request validated (every bad input a 400 before any model work) and the role it pins."""
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as err:
            msg, param = validation_message(err, tuple(CompletionRequest.model_fields))
            raise bad_request(msg, param) from None
        if (key := req.unsupported()) is not None:
            raise bad_request(f"{key} is not supported by this server (only {UNSUPPORTED[key]!r})", key)
        if req.max_tokens > self.opts.max_tokens_limit:
            raise bad_request(f"max_tokens must be 1..{self.opts.max_tokens_limit}, got {req.max_tokens}",
                              "max_tokens")
        pins = self.model_ids()
        if req.model not in pins:
            raise ApiError(404, f"model {req.model!r} is not served here; valid: {', '.join(pins)}",
                           "not_found_error", "model")
        return req, pins[req.model]

    @staticmethod
    def prompt_ids(lm: LoadedModel, req: CompletionRequest) -> list[int]:
        with lm.tok_lock:  # microseconds: fine on the event loop
            ids = lm.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise bad_request("the prompt is empty after tokenization", "prompt")
        if len(ids) + req.max_tokens > lm.context:
            raise bad_request(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                              f"model's context of {lm.context} tokens", "max_tokens")
        return ids

    async def _start(self, req: CompletionRequest, pin: Role | None, t0: float):
        """Route the request and wait for its first event; a challenger that fails to answer is taken out of
        rotation and (unless the request pinned it) the champion answers instead.
        Returns (role, model, run, first event); the caller releases the model."""
        role, lm = self.pool.acquire(pin)
        self.metrics.requests.labels(self.name, lm.label).inc()
        run = None
        try:
            params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    seed=req.seed, stop_token_ids=lm.eos)
            slow = self.opts.challenger_slowdown_ms / 1000 if role == Role.CHALLENGER else 0.0
            run = _Run(lm, self.prompt_ids(lm, req), params, self.metrics, self.name, t0, slow)
            first = await run.next()
        except BaseException as err:
            if run is not None:
                run.cancel.set()
            self.pool.release(lm)
            if isinstance(err, ApiError):
                self.metrics.errors.labels(self.name, lm.label, err.type).inc()
            raise
        if first[0] == "error" and role == Role.CHALLENGER:
            self.metrics.errors.labels(self.name, lm.label, "model_error").inc()
            self.pool.release(lm)
            self.pool.take_out(lm, f"failed to answer: {first[1]}")
            if pin is None:
                return await self._start(req, Role.CHAMPION, t0)
        return role, lm, run, first

    async def create(self, req: CompletionRequest, pin: Role | None, t0: float):
        """The answer: a JSONResponse, or a StreamingResponse of server-sent events when req.stream."""
        role, lm, run, first = await self._start(req, pin, t0)
        headers = {"x-model-version": lm.label, "x-model-role": role}
        if first[0] == "error":
            if role == Role.CHAMPION:  # a pinned challenger was released (and taken out) in _start()
                self.pool.release(lm)
            self.metrics.errors.labels(self.name, lm.label, "server_error").inc()
            return ApiError(500, f"version {lm.label} failed to answer: {first[1]}", "server_error").response(headers)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(self._events(req, lm, run, first, cid, created), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        text, event = [], first
        try:
            while event[0] == "token":
                text.append(event[1])
                event = await run.next()
        finally:
            run.cancel.set()  # the client went away: stop generating at the next token
            self.pool.release(lm)
        if event[0] == "error":
            self.metrics.errors.labels(self.name, lm.label, "server_error").inc()
            return ApiError(500, f"version {lm.label} failed mid-answer: {event[1]}", "server_error").response(headers)
        n_in, n_out = len(run.prompt_ids), run.completion_tokens
        body = CompletionResponse(
            id=cid, created=created, model=req.model, system_fingerprint=f"{self.name}/v{lm.label}",
            choices=[CompletionChoice(text="".join(text), finish_reason=event[1])],
            usage=Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out))
        return JSONResponse(body.model_dump(), headers=headers)

    async def _events(self, req: CompletionRequest, lm: LoadedModel, run: _Run, first, cid: str,
                      created: int) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None) -> str:
            return sse(CompletionResponse(id=cid, created=created, model=req.model,
                                          choices=[CompletionChoice(text=text, finish_reason=finish)]))

        event = first
        try:
            while event[0] == "token":
                if event[1]:
                    yield chunk(event[1], None)
                event = await run.next()
            if event[0] == "error":
                self.metrics.errors.labels(self.name, lm.label, "server_error").inc()
                yield sse({"error": {"message": event[1], "type": "server_error"}})
                return
            yield chunk("", event[1])
            yield SSE_DONE
        finally:
            run.cancel.set()  # the client went away: stop generating at the next token
            self.pool.release(lm)
