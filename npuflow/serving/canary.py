"""Rollout against a serving process over HTTP: leased routing weights, a bounded load generator, /metrics stats.

The serving process is `npuflow serve` (npuflow.serving.app.create_app); its admin token, if it has one, comes from
the environment variable NPUFLOW_SERVE_TOKEN. `embedded_server` runs that app in this process on 127.0.0.1 with a
random token of its own, which every request made here to its URL sends.

Canary weights are a lease (POST /admin/weights with lease_s): set_weights starts a daemon thread that renews
them every third of the lease until the weights are set again for that server. A rollout that dies (SIGKILL
included) stops renewing, and the server sends all traffic back to the champion once the lease lapses: within
one analysis window (lease_for), never left at a canary share by a process that is gone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from npuflow.core.config import StageConfig
from npuflow.core.errors import NpuflowError
from npuflow.serving.promstats import VersionStats, parse_metrics

log = logging.getLogger("npuflow.canary")
TIMEOUT_S = 60.0  # per HTTP request, seconds
LEASE_MIN_S = 10.0  # shortest weights lease, seconds: a stage with (almost) no minimum duration still gets this
RENEW_EVERY = 1 / 3  # renewals at this fraction of the lease: two may fail or run slow before it lapses


def lease_for(stage: StageConfig) -> float:
    """A stage's canary weight lease, seconds: one analysis window (min_duration_s, the shortest interval a
    stage is judged on; 60 s by default), at least LEASE_MIN_S."""
    return max(stage.min_duration_s, LEASE_MIN_S)


DEFAULT_LEASE_S = lease_for(StageConfig(name="canary"))  # the default stage's window, 60 s


class LoadSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    sent: int  # requests sent (shadow: each counted once, though mirrored to both versions)
    by_role: dict[str, int]  # answered requests per x-model-role
    failed: int  # answers with an HTTP error status or no answer
    elapsed_s: float


_tokens: dict[str, str] = {}  # URL -> bearer token of the servers embedded_server runs in this process


def _headers(url: str) -> dict[str, str]:
    token = _tokens.get(url) or os.environ.get("NPUFLOW_SERVE_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


def _post_weights(url: str, body: dict[str, Any], timeout_s: float) -> dict:
    r = httpx.post(f"{url}/admin/weights", json=body, headers=_headers(url), timeout=timeout_s)
    if 400 <= r.status_code < 500 and "lease_s" in body and "lease_s" in r.text:
        raise NpuflowError(f"{url} does not take a weights lease (POST /admin/weights answered {r.status_code}: "
                           f"{r.text[:200]}): it runs an npuflow older than the staged rollout needs, whose canary "
                           "weights would outlive a rollout that dies. Upgrade and restart that server, then re-run "
                           "the rollout; nothing was changed on it")
    if r.status_code != 200:
        raise NpuflowError(f"{url}/admin/weights answered {r.status_code}: {r.text[:300]}")
    return r.json()


class _Renewal(threading.Thread):
    """Re-posts one server's leased weights every RENEW_EVERY of the lease until stopped; gives up once a
    whole lease has passed without a successful renewal (the server has sent the traffic back by then)."""

    def __init__(self, url: str, body: dict[str, Any], lease_s: float):
        super().__init__(name="npuflow-weights-lease", daemon=True)
        self.url, self.body, self.lease_s = url, body, lease_s
        self.stopped = threading.Event()
        self.posting = threading.Lock()  # held while a renewal is in flight

    def run(self) -> None:
        every, last_ok = self.lease_s * RENEW_EVERY, time.monotonic()
        while not self.stopped.wait(every):
            with self.posting:
                if self.stopped.is_set():
                    return
                try:
                    _post_weights(self.url, self.body, timeout_s=every)
                    last_ok = time.monotonic()
                except Exception as err:  # unreachable, refused, anything: logged, retried at the next tick
                    lapsed = time.monotonic() - last_ok >= self.lease_s
                    log.warning("renewing the weights lease on %s failed%s: %s", self.url,
                                " for a whole lease: stopped (the server has given the champion all traffic)"
                                if lapsed else "", err)
                    if lapsed:
                        return

    def stop(self) -> None:
        self.stopped.set()
        with self.posting:  # a renewal in flight lands before whatever is posted next
            pass


_renewals: dict[str, _Renewal] = {}
_renewals_lock = threading.Lock()


def stop_renewing(url: str) -> None:
    """Stop renewing the weights lease on `url` (it lapses on the server within its lease_s)."""
    with _renewals_lock:
        renewal = _renewals.pop(url, None)
    if renewal is not None:
        renewal.stop()


def set_weights(url: str, champion: float, challenger: float, lease_s: float | None = DEFAULT_LEASE_S) -> dict:
    """Set the routing weights (relative) and return the server's answer; raises on an HTTP error.

    A challenger weight > 0 is sent as a lease of lease_s seconds (lease_for(stage) in a rollout), renewed from
    a daemon thread of this process until the next set_weights for `url` (or stop_renewing); lease_s None:
    permanent weights, not renewed."""
    stop_renewing(url)
    body: dict[str, Any] = {"champion": champion, "challenger": challenger}
    lease = lease_s if challenger > 0 else None
    if lease is not None:
        body["lease_s"] = lease
    answer = _post_weights(url, body, TIMEOUT_S)
    if lease is not None:
        renewal = _Renewal(url, body, lease)
        with _renewals_lock:
            _renewals[url] = renewal
        renewal.start()
    return answer


def reload(url: str) -> dict:
    r = httpx.post(f"{url}/admin/reload", headers=_headers(url), timeout=300)
    if r.status_code != 200:
        raise NpuflowError(f"{url}/admin/reload answered {r.status_code}: {r.text[:300]}")
    return r.json()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", headers=_headers(url), timeout=TIMEOUT_S).json()


def read_stats(url: str, model: str) -> dict[str, VersionStats]:
    r = httpx.get(f"{url}/metrics", headers=_headers(url), timeout=TIMEOUT_S)
    r.raise_for_status()
    return parse_metrics(r.text, model)


def prompts_from_text(text: str, n: int = 64, words: int = 12) -> list[str]:
    """Up to n prompts of `words` words each, cut from the evaluation text in order."""
    toks = re.findall(r"\S+", text)
    out = [" ".join(toks[i:i + words]) for i in range(0, len(toks) - words + 1, words)][:n]
    if not out:
        raise NpuflowError("the evaluation text has too few words to make load-generator prompts")
    return out


def run_load(url: str, model: str, prompts: list[str], stage: StageConfig, max_tokens: int,
             concurrency: int) -> LoadSummary:
    """Replay prompts until the challenger has min_requests answers and min_duration_s has passed, or until
    max_requests / max_duration_s (whichever first), and lasts min_duration_s at least. Shadow stages send every prompt to both versions
    (model NAME@champion and NAME@challenger), the weighted stages send NAME and let the server route."""
    t0 = time.monotonic()
    lock = threading.Lock()
    state = {"sent": 0, "failed": 0, "by_role": {}}
    shadow = stage.name == "shadow"

    def done() -> bool:
        elapsed = time.monotonic() - t0
        if state["sent"] >= stage.max_requests or elapsed >= stage.max_duration_s:
            return True
        return state["by_role"].get("challenger", 0) >= stage.min_requests and elapsed >= stage.min_duration_s

    def one(http: httpx.Client, prompt: str, model_id: str) -> None:
        try:
            r = http.post(f"{url}/v1/completions", headers=_headers(url), timeout=TIMEOUT_S,
                          json={"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            role = r.headers.get("x-model-role", "unknown") if r.status_code == 200 else None
        except httpx.HTTPError:
            role = None
        with lock:
            if role is None:
                state["failed"] += 1
            else:
                state["by_role"][role] = state["by_role"].get(role, 0) + 1

    def worker(i: int) -> None:
        with httpx.Client() as http:
            while True:
                with lock:
                    if done():
                        return
                    k = state["sent"]
                    state["sent"] += 1
                prompt = prompts[(k + i) % len(prompts)]
                if shadow:
                    one(http, prompt, f"{model}@champion")
                    one(http, prompt, f"{model}@challenger")
                else:
                    one(http, prompt, model)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    # max_requests reached early: the stage still lasts min_duration_s (capped by max_duration_s), as an
    # analysis window does, so a verdict never turns inconclusive only because the requests ran out fast
    rest = min(stage.min_duration_s, stage.max_duration_s) - (time.monotonic() - t0)
    if rest > 0:
        time.sleep(rest + 0.05)
    return LoadSummary(sent=state["sent"], by_role=state["by_role"], failed=state["failed"],
                       elapsed_s=time.monotonic() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def embedded_server(opts, make_pool: Callable | None = None) -> Iterator[str]:
    """`npuflow serve` in this process (uvicorn in a thread) on 127.0.0.1 and a free port; yields its URL.
    opts: npuflow.serving.options.ServeOptions. It requires a bearer token (opts.token, else a random one),
    which the functions of this module send to its URL. make_pool(opts) -> ModelPool: the pool to serve
    (default npuflow.serving.loading.registry_pool: the registry's versions)."""
    import uvicorn

    from npuflow.serving.app import create_app
    from npuflow.serving.loading import registry_pool

    opts = opts.model_copy(update={"token": opts.token or secrets.token_urlsafe(32)})
    pool = (make_pool or registry_pool)(opts)
    pool.reload()
    server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="npuflow-embedded-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise NpuflowError("the embedded serving process did not start within 60 s")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    _tokens[url] = opts.token
    try:
        yield url
    finally:
        stop_renewing(url)
        _tokens.pop(url, None)
        server.should_exit = True
        thread.join(timeout=30)
