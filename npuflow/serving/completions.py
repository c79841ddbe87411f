"""OpenAI completions and chat completions over the pool: validate, route, generate, answer (JSON or SSE).

`ServingCompletions` is handed the pool, its metrics and the options, like vLLM's
OpenAIServingCompletion: the routes only parse HTTP and call it, so it is testable without a server.
Every bad input is a 4xx before any model work and never counts against a version; TTFT, TPOT and
errors are measured here, where the client sees them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from npuflow.core.names import Alias, Role
from npuflow.runtime.engine import SamplingParams
from npuflow.serving.generation import Run
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.metrics import ServeMetrics
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool
from npuflow.serving.protocol import (
    SSE_DONE,
    ApiError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    bad_request,
    sse,
    validation_message,
)
from npuflow.serving.remote import RemoteRun

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


@dataclass
class Generation:
    """One request's text as it is generated: incremental detokenization and stop strings."""

    lm: LoadedModel
    run: Run
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text handed to the client so far
    finish: str | None = None

    def add(self, tok: int) -> str:
        """The new text the token completes (held back inside a multi-byte character or a possible stop)."""
        self.ids.append(tok)
        with self.lm.tok_lock:
            text = self.lm.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        for stop in self.stops:
            at = text.find(stop, max(0, len(self.sent) - len(stop)))
            if at >= 0:
                self.finish = "stop"
                self.run.cancel()  # the slot is free at the next step
                delta, self.sent = text[len(self.sent):at], text[:at]
                return delta
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = len(text) - hold
        delta = text[len(self.sent):end] if end > len(self.sent) else ""
        self.sent += delta
        return delta

    def flush(self) -> str:
        """At the end, text held back for a stop string that never came."""
        if self.finish == "stop":
            return ""
        with self.lm.tok_lock:
            text = self.lm.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.sent):] if text.startswith(self.sent) and not text.endswith("\ufffd") else ""
        self.sent += delta
        return delta


@dataclass
class RemoteGeneration:
    """One request's text from a vLLM engine: it detokenizes and applies stop strings itself, so each
    streamed chunk is handed on as it is (`ids` counts the chunks, one token each)."""

    run: RemoteRun
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    finish: str | None = None

    def add(self, piece: str) -> str:
        self.ids.append(0)
        self.sent += piece
        return piece

    def flush(self) -> str:
        return ""


class ServingCompletions:
    """POST /v1/completions and /v1/chat/completions for one model line: the champion and a challenger."""

    def __init__(self, pool: ModelPool, metrics: ServeMetrics, opts: ServeOptions):
        self.pool, self.metrics, self.opts, self.name = pool, metrics, opts, opts.name

    def model_ids(self) -> dict[str, Role | None]:
        """The ids a request may name -> the role it pins (None: weighted routing)."""
        name = self.name
        return {name: None, f"{name}@{Alias.CHAMPION}": Role.CHAMPION, f"{name}@{Role.CHALLENGER}": Role.CHALLENGER,
                f"{name}@{self.opts.challenger_alias}": Role.CHALLENGER}

    def parse(self, data: dict[str, Any], kind: type[BaseModel] = CompletionRequest):
        """The request validated (every bad input a 400 before any model work) and the role it pins."""
        try:
            req = kind.model_validate(data)
        except ValidationError as err:
            msg, param = validation_message(err, tuple(kind.model_fields))
            raise bad_request(msg, param) from None
        if (key := req.unsupported()) is not None:
            raise bad_request(f"{key} is not supported by this server (only {req._unsupported[key]!r})", key)
        limit = self.opts.max_tokens_limit
        if self.max_tokens(req) > limit:
            raise bad_request(f"max_tokens must be 1..{limit}, got {self.max_tokens(req)}", "max_tokens")
        pins = self.model_ids()
        if req.model not in pins:
            raise ApiError(404, f"model {req.model!r} is not served here; valid: {', '.join(pins)}",
                           "not_found_error", "model")
        return req, pins[req.model]

    def max_tokens(self, req, room: int | None = None) -> int:
        """Asked for, or the default: completions 16; chat as many as the context has room for (up to the
        server's limit), as vLLM does."""
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None:
            return asked
        if isinstance(req, CompletionRequest):
            return DEFAULT_MAX_TOKENS
        return max(1, min(self.opts.max_tokens_limit, room if room is not None else self.opts.max_tokens_limit))

    def prompt_ids(self, lm: LoadedModel, req) -> list[int]:
        """Token ids of the prompt (text, token ids or chat messages), checked against the model's context."""
        if isinstance(req, ChatCompletionRequest):
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            if not getattr(lm.tokenizer, "chat_template", None):
                raise bad_request(f"version {lm.label}'s tokenizer has no chat template: use /v1/completions",
                                  "messages")
            with lm.tok_lock:
                ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        elif isinstance(req.prompt, list):
            vocab = lm.vocab_size or (lm.model.config.vocab_size if lm.model is not None else 0)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise bad_request(f"prompt token ids must be 0..{vocab - 1} (this model's vocabulary)", "prompt")
            ids = list(req.prompt)
        else:
            with lm.tok_lock:  # microseconds: fine on the event loop
                ids = lm.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise bad_request("the prompt is empty after tokenization", "prompt")
        n = self.max_tokens(req, lm.context - len(ids))
        if len(ids) + n > lm.context:
            raise bad_request(f"prompt ({len(ids)} tokens) + max_tokens ({n}) exceeds the model's context of "
                              f"{lm.context} tokens", "max_tokens")
        return ids

    async def _start(self, req, pin: Role | None, t0: float):
        """Route the request, tokenize it for the chosen version and wait for its first event. A challenger
        whose engine fails is taken out of rotation and (unless the request pinned it) the champion
        answers. Client errors (ApiError) never count against a version. Returns (role, model, gen, first)."""
        role, lm = self.pool.acquire(pin)
        self.metrics.requests.labels(self.name, lm.label).inc()
        run: Run | RemoteRun | None = None
        try:
            ids = self.prompt_ids(lm, req)
            n = self.max_tokens(req, lm.context - len(ids))
            if lm.remote is not None:  # vLLM: the same prompt ids and sampling, streamed from the engine
                body = {"max_tokens": n, "temperature": req.temperature, "top_p": req.top_p,
                        "ignore_eos": req.ignore_eos, **({"seed": req.seed} if req.seed is not None else {}),
                        **({"stop": req.stop_strings} if req.stop_strings else {})}
                run = lm.remote.start(ids, body)
                gen: Generation | RemoteGeneration = RemoteGeneration(run)
            else:
                params = SamplingParams(max_tokens=n, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                        stop_token_ids=frozenset() if req.ignore_eos else lm.eos)
                run = Run(lm.batcher, ids, params)
                lm.batcher.submit(run)  # type: ignore[union-attr]
                gen = Generation(lm, run, req.stop_strings)
            first = await run.next()
        except BaseException as err:
            if run is not None:
                run.cancel()
            self.pool.release(lm)
            if isinstance(err, ApiError):
                self.metrics.errors.labels(self.name, "none", err.type).inc()
            raise
        if first[0] == "error" and role == Role.CHALLENGER:
            self.metrics.errors.labels(self.name, lm.label, "model_error").inc()
            self.pool.release(lm)
            self.pool.take_out(lm, f"failed to answer: {first[1]}")
            if pin is None:
                return await self._start(req, Role.CHAMPION, t0)
        return role, lm, gen, first

    async def _deltas(self, lm: LoadedModel, gen: Generation, first, t0: float) -> AsyncIterator[str]:
        """Text deltas until the end; gen.finish holds the reason (or "error: ...") afterwards. Observes
        TTFT and TPOT per version; cancels the run and releases the model however it ends."""
        labels, last, event = (self.name, lm.label), None, first
        try:
            while event[0] == "token":
                now = time.perf_counter()
                if last is None:
                    self.metrics.ttft.labels(*labels).observe(now - t0)
                else:
                    self.metrics.tpot.labels(*labels).observe(now - last)
                last = now
                self.metrics.tokens.labels(*labels).inc()
                delta = gen.add(event[1])
                if delta:
                    yield delta
                if gen.finish == "stop":
                    return
                event = await gen.run.next()
            if event[0] == "error":
                self.metrics.errors.labels(*labels, "server_error").inc()
                gen.finish = f"error: {event[1]}"
                return
            tail = gen.flush()
            if tail:
                yield tail
            gen.finish = event[1]
        finally:
            gen.run.cancel()  # the client went away (or a stop string ended it): the slot frees at the next step
            self.pool.release(lm)

    async def create(self, req, pin: Role | None, t0: float):
        """The answer to a completion or chat request: JSON, or server-sent events when req.stream."""
        chat = isinstance(req, ChatCompletionRequest)
        role, lm, gen, first = await self._start(req, pin, t0)
        headers = {"x-model-version": lm.label, "x-model-role": role}
        if first[0] == "error":
            if role == Role.CHAMPION:  # a pinned challenger was released (and taken out) in _start()
                self.pool.release(lm)
            self.metrics.errors.labels(self.name, lm.label, "server_error").inc()
            return ApiError(500, f"version {lm.label} failed to answer: {first[1]}", "server_error").response(headers)
        cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        deltas = self._deltas(lm, gen, first, t0)
        if req.stream:
            events = (self._chat_events if chat else self._events)(req, lm, gen, deltas, cid, created)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        text = "".join([d async for d in deltas])
        if gen.finish and gen.finish.startswith("error: "):
            return ApiError(500, f"version {lm.label} failed mid-answer: {gen.finish[7:]}",
                            "server_error").response(headers)
        usage = self._usage(gen)
        if chat:
            body = ChatCompletionResponse(
                id=cid, created=created, model=req.model, system_fingerprint=f"{self.name}/v{lm.label}",
                choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=gen.finish)], usage=usage)
        else:
            body = CompletionResponse(
                id=cid, created=created, model=req.model, system_fingerprint=f"{self.name}/v{lm.label}",
                choices=[CompletionChoice(text=text, finish_reason=gen.finish)], usage=usage)
        return JSONResponse(body.model_dump(), headers=headers)

    @staticmethod
    def _usage(gen: Generation | RemoteGeneration) -> Usage:
        n_in, n_out = len(gen.run.prompt_ids), len(gen.ids)
        counted = getattr(gen.run, "usage", None)  # what vLLM counted, when it said
        if counted and "completion_tokens" in counted:
            n_out = int(counted["completion_tokens"])
        return Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)

    async def _events(self, req, lm, gen, deltas, cid: str, created: int) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None) -> str:
            return sse(CompletionResponse(id=cid, created=created, model=req.model,
                                          choices=[CompletionChoice(text=text, finish_reason=finish)]))

        async for delta in deltas:
            yield chunk(delta, None)
        if gen.finish and gen.finish.startswith("error: "):
            yield sse({"error": {"message": gen.finish[7:], "type": "server_error"}})
            return
        yield chunk("", gen.finish)
        if req.include_usage:
            yield sse(CompletionResponse(id=cid, created=created, model=req.model, choices=[],
                                         usage=self._usage(gen)))
        yield SSE_DONE

    async def _chat_events(self, req, lm, gen, deltas, cid: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: ChatDelta, finish: str | None = None) -> str:
            return sse(ChatCompletionChunk(id=cid, created=created, model=req.model,
                                           choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))

        yield chunk(ChatDelta(role="assistant", content=""))
        async for delta in deltas:
            yield chunk(ChatDelta(content=delta))
        if gen.finish and gen.finish.startswith("error: "):
            yield sse({"error": {"message": gen.finish[7:], "type": "server_error"}})
            return
        yield chunk(ChatDelta(), gen.finish)
        if req.include_usage:
            yield sse(ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[],
                                          usage=self._usage(gen)))
        yield SSE_DONE
