"""Rollout against a serving process over HTTP: routing weights, a bounded load generator, /metrics stats.

The serving process is `npuflow serve` (npuflow.serving.app.create_app); its admin token, if it has one, comes from
the environment variable NPUFLOW_SERVE_TOKEN. `embedded_server` runs that app in this process on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
from pydantic import BaseModel, ConfigDict

from npuflow.core.config import StageConfig
from npuflow.core.errors import NpuflowError
from npuflow.serving.promstats import VersionStats, parse_metrics

log = logging.getLogger("npuflow.canary")
TIMEOUT_S = 60.0  # per HTTP request, seconds


class LoadSummary(BaseModel):
    model_config = ConfigDict(frozen=True)
    sent: int  # requests sent (shadow: each counted once, though mirrored to both versions)
    by_role: dict[str, int]  # answered requests per x-model-role
    failed: int  # answers with an HTTP error status or no answer
    elapsed_s: float


def _headers() -> dict[str, str]:
    token = os.environ.get("NPUFLOW_SERVE_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


def set_weights(url: str, champion: float, challenger: float) -> dict:
    """Set the routing weights (relative) and return the server's answer; raises on an HTTP error."""
    r = httpx.post(f"{url}/admin/weights", json={"champion": champion, "challenger": challenger},
                   headers=_headers(), timeout=TIMEOUT_S)
    if r.status_code != 200:
        raise NpuflowError(f"{url}/admin/weights answered {r.status_code}: {r.text[:300]}")
    return r.json()


def reload(url: str) -> dict:
    r = httpx.post(f"{url}/admin/reload", headers=_headers(), timeout=300)
    if r.status_code != 200:
        raise NpuflowError(f"{url}/admin/reload answered {r.status_code}: {r.text[:300]}")
    return r.json()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=TIMEOUT_S).json()


def read_stats(url: str, model: str) -> dict[str, VersionStats]:
    r = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S)
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
            r = http.post(f"{url}/v1/completions", headers=_headers(), timeout=TIMEOUT_S,
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
def embedded_server(opts) -> Iterator[str]:
    """`npuflow serve` in this process (uvicorn in a thread) on 127.0.0.1 and a free port; yields its URL.
    opts: npuflow.serving.options.ServeOptions."""
    import uvicorn

    from npuflow.serving.app import create_app
    from npuflow.serving.loading import registry_pool

    pool = registry_pool(opts)
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
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
