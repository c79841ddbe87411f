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

import asyncio
import hmac
import json
import logging
import random
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from npuflow import registry
from npuflow.artifacts import Deployable, QuantizedArtifact, load_manifest, materialize
from npuflow.backends import get_backend
from npuflow.errors import NpuflowError
from npuflow.runtime import DTYPES, load_quantized, load_tokenizer
from npuflow.store import open_store

log = logging.getLogger("npuflow.serve")

CHAMPION_ROLE, CHALLENGER_ROLE = "champion", "challenger"
Role = Literal["champion", "challenger"]
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TPOT_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # s per token
UNSUPPORTED = {  # OpenAI completion fields this server does not implement -> the only value it accepts
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "stop": None, "suffix": None,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
}


class ServeOptions(BaseModel):
    """What one serving process serves and how (CLI flags and environment, validated once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # registered model (the config's `name`)
    tracking_uri: str  # MLflow registry
    store_uri: str  # artifact store, tried before the one recorded with the deployable
    cache_dir: Path  # local copies of remote artifacts
    challenger_alias: str = registry.CANDIDATE  # served beside the champion when it is another version
    champion_weight: float = Field(100.0, ge=0)  # relative routing weight
    challenger_weight: float = Field(0.0, ge=0)  # relative routing weight (0: loaded, no weighted traffic)
    token: str | None = None  # bearer token for /v1 and /admin; None: no auth
    max_tokens_limit: int = Field(256, ge=1)  # largest max_tokens a request may ask for, tokens
    max_body_bytes: int = Field(64 << 10, ge=1024)  # request bodies above this get 413
    max_in_flight: int = Field(64, ge=1)  # requests queued or running per model; above: 503
    seed: int = 0  # routing RNG seed (the same seed, the same sequence of choices)
    # Tests and rehearsals only: sleep this long before each token the challenger generates, ms. It makes a
    # challenger measurably slow through the real serving path (no mock) so a canary analysis can fail it.
    challenger_slowdown_ms: float = Field(0.0, ge=0)


# ---- one loaded version ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A registry version loaded on its device, with the lock that serialises its forward passes."""

    version: registry.ModelVersion
    deployable: Deployable
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    context: int  # max_position_embeddings: prompt + generated tokens at most
    eos: frozenset[int]  # token ids that end a completion
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass at a time
    tok_lock: threading.Lock = field(default_factory=threading.Lock)  # the Rust tokenizer is not shared-safe
    in_flight: int = 0  # requests queued or running on this model (guarded by the pool's lock)

    @property
    def label(self) -> str:
        return self.version.version


def _find_quantized(deployable: Deployable, location: dict[str, str], store_uri: str):
    """The quantized weights' manifest and store: the configured store first, then the recorded one."""
    roots = [store_uri]
    uri, key = location.get("uri", ""), location.get("key", "")
    if key and uri.endswith(key):
        roots.append(uri[: -len(key)].rstrip("/"))
    for root in dict.fromkeys(roots):
        store = open_store(root)
        found = load_manifest(store, deployable.quantized_key, QuantizedArtifact)
        if found is not None:
            return found, store
    raise NpuflowError(
        f"the quantized weights {deployable.quantized_key} are not in {' or '.join(dict.fromkeys(roots))}; "
        "re-run the release or point NPUFLOW_STORE_URI at the store that holds them"
    )


def load_version(c, version: registry.ModelVersion, opts: ServeOptions) -> LoadedModel:
    """Load a registered version's quantized weights with its deployable's device and dtype, then check
    that it answers (one forward pass)."""
    deployable, location = registry.deployable_of(c, version)
    backend = get_backend(deployable.device)
    quantized, store = _find_quantized(deployable, location, opts.store_uri)
    model_dir = materialize(store, quantized.key, quantized.files, opts.cache_dir)
    graph = deployable.runtime == "npuflow-graph"
    model = load_quantized(model_dir, backend, DTYPES[deployable.dtype], graph=graph)
    tokenizer = load_tokenizer(model_dir)
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id,
                                                                      tokenizer.eos_token_id]
    lm = LoadedModel(version=version, deployable=deployable, model=model, tokenizer=tokenizer,
                     device=backend.device(), context=int(cfg.max_position_embeddings),
                     eos=frozenset(i for i in eos if i is not None))
    with torch.inference_mode():
        logits = model(torch.tensor([[tokenizer.bos_token_id or 0]], device=lm.device)).logits  # (1, 1, V)
    if not torch.isfinite(logits).all():
        raise NpuflowError(f"{version.name} version {version.version} produced NaN/Inf logits when loaded")
    log.info("loaded %s version %s (%s, %s) from %s", version.name, version.version, deployable.device,
             deployable.dtype, model_dir)
    return lm


# ---- generation (runs in a worker thread) ----------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # tokens to generate at most
    temperature: float  # 0: greedy
    top_p: float  # nucleus: smallest set of tokens whose probability reaches top_p
    seed: int | None  # sampling RNG seed; None: a fresh one


def _next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token id from the last position's logits (V,)."""
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)  # (V,)
    if s.top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < s.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate(lm: LoadedModel, prompt_ids: list[int], s: Sampling) -> Iterator[tuple[str, str | None]]:
    """Yield (text delta, None) per generated token, then ("", finish_reason): "stop" at EOS, else "length".

    The caller holds lm.lock. Text is decoded incrementally; a token that ends inside a multi-byte
    character is held back until the character is complete.
    """
    gen = torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
    x = torch.tensor([prompt_ids], device=lm.device)  # (1, T_in)
    cache, out_ids, sent = None, [], ""
    for _ in range(s.max_tokens):
        out = lm.model(x, cache=cache, use_cache=True)  # logits (1, T, V)
        cache = out.cache
        tok = _next_token(out.logits[0, -1], s, gen)
        if tok in lm.eos:
            yield "", "stop"
            return
        out_ids.append(tok)
        with lm.tok_lock:
            text = lm.tokenizer.decode(out_ids, skip_special_tokens=True)
        delta = "" if text.endswith("\ufffd") or not text.startswith(sent) else text[len(sent):]
        sent += delta
        yield delta, None
        x = torch.tensor([[tok]], device=lm.device)  # (1, 1)
    yield "", "length"


class _Run:
    """One generation in a worker thread, its events handed to the event loop through a queue.

    Events: ("token", delta), ("finish", reason), ("error", message). `cancel` stops it at the next token.
    """

    def __init__(self, lm: LoadedModel, prompt_ids: list[int], s: Sampling, metrics: _Metrics,
                 model_name: str, t0: float, slowdown_s: float = 0.0):
        self.lm, self.prompt_ids, self.s, self.metrics = lm, prompt_ids, s, metrics
        self.slowdown_s = slowdown_s  # ServeOptions.challenger_slowdown_ms on the challenger, else 0
        self.name, self.t0 = model_name, t0  # t0: request arrival, perf_counter seconds
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()
        self.completion_tokens = 0
        threading.Thread(target=self._work, name=f"npuflow-gen-v{lm.label}", daemon=True).start()

    def _put(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def _work(self) -> None:
        labels = (self.name, self.lm.label)
        try:
            with self.lm.lock:
                last = None
                for delta, finish in generate(self.lm, self.prompt_ids, self.s):
                    if self.slowdown_s:
                        time.sleep(self.slowdown_s)
                    now = time.perf_counter()
                    if last is None:
                        self.metrics.ttft.labels(*labels).observe(now - self.t0)
                    elif finish is None:
                        self.metrics.tpot.labels(*labels).observe(now - last)
                    last = now
                    if finish is not None:
                        self._put("finish", finish)
                        return
                    self.completion_tokens += 1
                    self.metrics.tokens.labels(*labels).inc()
                    self._put("token", delta)
                    if self.cancel.is_set():
                        self._put("finish", "cancelled")
                        return
        except Exception as err:  # a model that fails to answer: reported to the request, never raised
            log.exception("generation failed on version %s", self.lm.label)
            self._put("error", f"{type(err).__name__}: {err}")

    async def next(self) -> tuple[str, Any]:
        return await self.queue.get()


# ---- the pool: which versions serve, with what weight ------------------------------------------------


@dataclass
class _Slot:
    alias: str
    model: LoadedModel | None = None
    version: str | None = None  # the version the alias pointed at when last resolved
    reason: str | None = None  # why it is not serving (out of rotation), or None
    since: str | None = None  # when it was taken out, UTC ISO


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelPool:
    """The champion and at most one challenger, with routing weights; thread-safe."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self._lock = threading.Lock()  # guards slots, weights and in-flight counts
        self._reload_lock = threading.Lock()  # one reload at a time
        self._rng = random.Random(opts.seed)
        self.champion = _Slot(registry.CHAMPION)
        self.challenger = _Slot(opts.challenger_alias)
        self.weights: dict[str, float] = {CHAMPION_ROLE: opts.champion_weight,
                                          CHALLENGER_ROLE: opts.challenger_weight}
        self.events: list[dict[str, str]] = []  # last reloads and rotation changes, newest last
        self.on_change: Callable[[], None] = lambda: None  # called after the served set or weights change

    def _event(self, what: str, **kw: str) -> None:
        self.events = [*self.events[-19:], {"at": _now(), "event": what, **kw}]
        log.info("%s %s", what, kw)

    def reload(self) -> dict[str, Any]:
        """Resolve the aliases and load what changed; the champion serves until its successor is ready.

        Raises NpuflowError only when there is no champion to serve at all.
        """
        with self._reload_lock:
            c = registry.client(self.opts.tracking_uri)
            name = self.opts.name
            loaded = {s.model.label: s.model for s in (self.champion, self.challenger) if s.model is not None}
            errors: list[str] = []
            champ_v = registry.by_alias(c, name, registry.CHAMPION)
            if champ_v is None:
                if self.champion.model is None:
                    raise NpuflowError(f"{name} has no `champion` alias in {self.opts.tracking_uri}: "
                                       "nothing to serve; run the release flow (`npuflow run CONFIG`) first")
                errors.append(f"the champion alias is gone; version {self.champion.model.label} serves on")
            elif self.champion.model is None or self.champion.model.label != champ_v.version:
                try:
                    new = loaded.get(champ_v.version) or load_version(c, champ_v, self.opts)
                except Exception as err:
                    msg = f"champion version {champ_v.version} failed to load: {err}"
                    if self.champion.model is None:
                        raise NpuflowError(msg) from None
                    errors.append(f"{msg}; version {self.champion.model.label} keeps serving")
                    self.champion.reason = msg
                else:
                    with self._lock:
                        self.champion = _Slot(registry.CHAMPION, new, champ_v.version)
                    self._event("champion", version=champ_v.version)
            champion_label = self.champion.model.label  # type: ignore[union-attr]
            chal_v = registry.by_alias(c, name, self.opts.challenger_alias)
            if chal_v is None or chal_v.version == champion_label:
                if self.challenger.version is not None:
                    self._event("challenger removed", version=self.challenger.version)
                with self._lock:
                    self.challenger = _Slot(self.opts.challenger_alias)
            elif self.challenger.model is None or self.challenger.model.label != chal_v.version:
                try:
                    new = loaded.get(chal_v.version) or load_version(c, chal_v, self.opts)
                except Exception as err:
                    self.take_out(None, f"failed to load: {err}", version=chal_v.version)
                    errors.append(f"challenger version {chal_v.version} failed to load: {err}")
                else:
                    with self._lock:
                        self.challenger = _Slot(self.opts.challenger_alias, new, chal_v.version)
                    self._event("challenger", version=chal_v.version)
            self.on_change()
            return {**self.health(), "errors": errors}

    def take_out(self, lm: LoadedModel | None, reason: str, version: str | None = None) -> None:
        """Take the challenger out of rotation (weight 0) with the reason; the champion keeps serving."""
        with self._lock:
            if lm is not None and self.challenger.model is not lm:
                return  # already replaced or taken out
            version = version or (lm.label if lm else None)
            self.challenger = _Slot(self.opts.challenger_alias, None, version, reason, _now())
        self._event("challenger out of rotation", version=version or "?", reason=reason)
        self.on_change()

    def set_weights(self, weights: dict[str, float]) -> None:
        with self._lock:
            self.weights = {**self.weights, **weights}
        self._event("weights", **{k: f"{v:g}" for k, v in self.weights.items()})
        self.on_change()

    def effective_weights(self) -> dict[str, float]:
        """Weights as routed: 0 for a challenger that is absent or out of rotation."""
        return {CHAMPION_ROLE: self.weights[CHAMPION_ROLE],
                CHALLENGER_ROLE: self.weights[CHALLENGER_ROLE] if self.challenger.model is not None else 0.0}

    def acquire(self, pin: Role | None = None) -> tuple[Role, LoadedModel]:
        """Pick a version for one request (weighted unless pinned) and count it in flight; release() after."""
        with self._lock:
            w = self.effective_weights()
            if pin is not None:
                role = pin
            elif w[CHALLENGER_ROLE] <= 0 or (w[CHAMPION_ROLE] > 0 and
                                             self._rng.random() * (w[CHAMPION_ROLE] + w[CHALLENGER_ROLE])
                                             < w[CHAMPION_ROLE]):
                role = CHAMPION_ROLE
            else:
                role = CHALLENGER_ROLE
            slot = self.champion if role == CHAMPION_ROLE else self.challenger
            if slot.model is None:
                raise ApiError(503, f"no {role} is in rotation" + (f": {slot.reason}" if slot.reason else ""),
                               "service_unavailable")
            if slot.model.in_flight >= self.opts.max_in_flight:
                raise ApiError(503, f"version {slot.model.label} has {slot.model.in_flight} requests in "
                               "flight; retry later", "overloaded")
            slot.model.in_flight += 1
            return role, slot.model

    def release(self, lm: LoadedModel) -> None:
        with self._lock:
            lm.in_flight -= 1

    def served(self) -> list[tuple[Role, LoadedModel]]:
        return [(r, s.model) for r, s in ((CHAMPION_ROLE, self.champion), (CHALLENGER_ROLE, self.challenger))
                if s.model is not None]

    def health(self) -> dict[str, Any]:
        with self._lock:
            eff = self.effective_weights()

            def slot(role: Role, s: _Slot) -> dict[str, Any] | None:
                if s.model is None and s.version is None:
                    return None
                m = s.model
                return {"alias": s.alias, "version": m.label if m else s.version,
                        "status": "serving" if m else "out_of_rotation", "weight": eff[role],
                        "requested_weight": self.weights[role], "reason": s.reason, "since": s.since,
                        "artifact_sha256": m.version.tags.get("artifact_sha256") if m else None,
                        "device": m.deployable.device if m else None, "in_flight": m.in_flight if m else 0}

            champ, chal = slot(CHAMPION_ROLE, self.champion), slot(CHALLENGER_ROLE, self.challenger)
        degraded = self.champion.reason is not None or (chal is not None and chal["status"] != "serving")
        return {"status": "degraded" if degraded else "ok", "model": self.opts.name, "champion": champ,
                "challenger": chal, "weights": eff, "events": list(self.events)}


# ---- HTTP ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields: neutral values accepted (UNSUPPORTED)
    model: str
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: StrictBool = False
    user: str | None = None


class WeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    champion: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    challenger: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)


class _Metrics:
    """Prometheus series in one registry per app, labelled by model and version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        mv = ("model", "version")
        self.requests = Counter("npuflow_serve_requests", "Completion requests routed to this version", mv,
                                registry=self.registry)
        self.errors = Counter("npuflow_serve_errors", "Requests answered with an error, by error type",
                              (*mv, "type"), registry=self.registry)
        self.tokens = Counter("npuflow_serve_generated_tokens", "Completion tokens generated", mv,
                              registry=self.registry)
        self.ttft = Histogram("npuflow_serve_ttft_seconds", "Request received to first token, seconds", mv,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("npuflow_serve_tpot_seconds", "Time per output token after the first, s", mv,
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.weight = Gauge("npuflow_serve_route_weight", "Effective routing weight", (*mv, "role"),
                            registry=self.registry)

    def served(self, name: str, pool: ModelPool) -> None:
        """Create every series of the versions now served (so both show before traffic) and the weights."""
        w = pool.effective_weights()
        self.weight.clear()
        for role, lm in pool.served():
            labels = (name, lm.label)
            for m in (self.requests, self.tokens, self.ttft, self.tpot):
                m.labels(*labels)
            self.weight.labels(*labels, role).set(w[role])


def _chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> str:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        param = param or loc
        parts.append(f"{loc}: {'required' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts), param


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
        pins: dict[str, Role | None] = {name: None, f"{name}@{registry.CHAMPION}": CHAMPION_ROLE,
                                        f"{name}@{CHALLENGER_ROLE}": CHALLENGER_ROLE,
                                        f"{name}@{opts.challenger_alias}": CHALLENGER_ROLE}
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
            slow = opts.challenger_slowdown_ms / 1000 if role == CHALLENGER_ROLE else 0.0
            run = _Run(lm, prompt_ids(lm, req), s, metrics, name, t0, slow)
            first = await run.next()
        except BaseException as err:
            if run is not None:
                run.cancel.set()
            pool.release(lm)
            if isinstance(err, ApiError):
                metrics.errors.labels(name, lm.label, err.type).inc()
            raise
        if first[0] == "error" and role == CHALLENGER_ROLE:
            metrics.errors.labels(name, lm.label, "model_error").inc()
            pool.release(lm)
            pool.take_out(lm, f"failed to answer: {first[1]}")
            if pin is None:
                return await start(req, CHAMPION_ROLE, s, t0)
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
            if role == CHAMPION_ROLE:  # a pinned challenger was released (and taken out) in start()
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
        ids = [name, f"{name}@{registry.CHAMPION}"]
        ids += [f"{name}@{CHALLENGER_ROLE}"] if pool.challenger.model else []
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
        if new[CHAMPION_ROLE] + new[CHALLENGER_ROLE] <= 0:
            raise ApiError(400, "at least one weight must be > 0", "invalid_request_error")
        pool.set_weights(new)
        h = pool.health()
        note = None
        if new[CHALLENGER_ROLE] > 0 and pool.challenger.model is None:
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
