"""Engines behind the npuflow router at a URL: vLLM, and npuflow's own tp x pp ranks (serving/ranks.py), each
as a child process group (or at a URL someone else runs), and the client that streams one request through it.

`EngineProcess` is the process group's lifetime; `VllmProcess` starts `python -m vllm.entrypoints.openai.api_server` in its own process group (vLLM runs
an API server, an EngineCore and workers) under a small guard: the guard holds the read end of a pipe
whose write end only this process has, so when this process dies in any way (SIGKILL included) the
guard reads EOF and kills the group. `stop()` kills the group (SIGTERM, SIGKILL after a grace period)
and waits until no process of it is left. (PR_SET_PDEATHSIG was not used: it fires when the *thread*
that forked exits, and versions are loaded from worker threads.)

`RemoteEngine.start(...)` sends the router's validated request to the engine's /v1/completions as
prompt token ids (the router tokenized it and applied the chat template, as for the npuflow engine, so
both engines see the same prompt), always streaming, and hands back a `RemoteRun` whose events are
those of the in-process `Run`: ("token", text), ("done", finish_reason) or ("error", message). Its
`cancel()` closes the upstream request, which vLLM aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from npuflow.core.config import ServingConfig
from npuflow.core.engines import ENGINE_ARGS
from npuflow.core.errors import ConfigError, NpuflowError

log = logging.getLogger("npuflow.serve")
REPO = Path(__file__).resolve().parents[2]  # the checkout of an editable install
STOP_GRACE_S = 20.0  # SIGTERM, then SIGKILL after this long
# Runs under the engine's interpreter (npuflow is not installed there): start the command in this
# process group (the session leader is this guard), kill the group when fd argv[1] reads EOF.
GUARD = """
import os, signal, subprocess, sys, threading, time
fd, grace = int(sys.argv[1]), float(sys.argv[2])
child = subprocess.Popen(sys.argv[3:])
orphan = threading.Event()
def orphaned():
    try:
        os.read(fd, 1)
    except OSError:
        pass
    orphan.set()
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and others():
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)
def others():
    me, group, n = os.getpid(), os.getpgid(0), 0
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(d) != me and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[2]) == group:
                n += 1
        except (OSError, ValueError, IndexError):
            pass
    return n
watcher = threading.Thread(target=orphaned, daemon=True)
watcher.start()
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
rc = child.wait()
if orphan.is_set():
    watcher.join()
sys.exit(rc)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_python(cfg: ServingConfig) -> Path:
    """The engine's interpreter, or a ConfigError. A relative path is tried against the working directory,
    then against the checkout npuflow runs from (where `make vllm` builds .venv-vllm)."""
    given = Path(cfg.python).expanduser()
    tried = [given] if given.is_absolute() else [Path.cwd() / given, REPO / given]
    for py in tried:
        if py.is_file() and os.access(py, os.X_OK):
            return py
    raise ConfigError(f"serving.python {cfg.python!r}: no vLLM interpreter at {' or '.join(map(str, tried))}; run "
                      "`make vllm` (builds .venv-vllm from infra/vllm/requirements.txt) or point serving.python at one")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EngineProcess:
    """One engine's OpenAI server as a child process group under the guard, for one served version: what
    starts it (`command`, `env`, `interpreter`) is the subclass's; start, health wait, stop and watch are here."""

    KIND = "engine"  # in messages and /health

    def __init__(self, cfg: ServingConfig, model_dir: Path, served_name: str, device: str, dtype: str,
                 max_model_len: int, log_path: Path):
        self.cfg, self.model_dir, self.served_name = cfg, model_dir, served_name
        self.device, self.dtype, self.max_model_len, self.log_path = device, dtype, max_model_len, log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.stopping = False
        self._wfd: int | None = None
        self._stop_lock = threading.Lock()  # shutdown and a take-out may stop it at once

    def interpreter(self) -> Path:
        """The Python that runs the guard (and, unless command() says otherwise, the engine)."""
        raise NotImplementedError

    def command(self, python: Path, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.cfg.env}

    def failure_hint(self) -> str:
        """What the engine's log says went wrong, with the fix where one is known ("" when nothing)."""
        return ""

    def log_text(self) -> str:
        """The engine's log so far ("" when it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the engine and wait for its /health; returns its URL. Raises NpuflowError with the tail of
        its log when it exits or does not answer within startup_timeout_s."""
        python = self.interpreter()
        self.port, self.stopping = free_port(), False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rfd, self._wfd = os.pipe()  # both non-inheritable; the guard gets rfd through pass_fds
        cmd = [str(python), "-c", GUARD, str(rfd), str(STOP_GRACE_S), *self.command(python, self.port)]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env(), start_new_session=True, pass_fds=(rfd,))
        os.close(rfd)
        log.info("%s %s: pid %d, port %d, log %s", self.KIND, self.served_name, self.proc.pid, self.port, self.log_path)
        deadline, t0 = time.monotonic() + self.cfg.startup_timeout_s, time.monotonic()
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise NpuflowError(f"{self.KIND} for {self.served_name} exited ({rc}) before it was healthy; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    log.info("%s %s healthy after %.0f s", self.KIND, self.served_name, time.monotonic() - t0)
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise NpuflowError(f"{self.KIND} for {self.served_name} did not answer /health within "
                                   f"{self.cfg.startup_timeout_s:g} s (serving.startup_timeout_s); its log "
                                   f"({self.log_path}) ends:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 25) -> str:
        try:
            with self.log_path.open("rb") as f:
                return b"".join(deque(f, lines)).decode(errors="replace").rstrip()
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill the engine's process group and wait until none of it is left (idempotent)."""
        with self._stop_lock:
            self.stopping = True
            proc, self.proc = self.proc, None
            try:
                if proc is not None:
                    self._kill_group(proc)
            finally:
                if self._wfd is not None:
                    os.close(self._wfd)  # after the group is gone (EOF would make the guard sweep it too)
                    self._wfd = None

    def _kill_group(self, proc: subprocess.Popen) -> None:
        pgid = proc.pid  # the guard leads its own session and group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE_S)
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(pgid):
            log.warning("%s %s: still running %.0f s after SIGTERM; SIGKILL", self.KIND, self.served_name, STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
            while group_alive(pgid):
                time.sleep(0.05)
        log.info("%s %s stopped", self.KIND, self.served_name)

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call on_exit(reason) from a thread when the engine exits without stop()."""
        proc = self.proc

        def wait() -> None:
            if proc is None:
                return
            rc = proc.wait()
            if not self.stopping and self.proc is proc:
                try:
                    on_exit(f"the {self.KIND} engine exited ({rc}); its log ends: {self.log_tail(3)}")
                except Exception:  # a thread must not die with an exception
                    log.exception("handling the exit of %s %s", self.KIND, self.served_name)

        threading.Thread(target=wait, name=f"{self.KIND}-watch-{self.served_name}", daemon=True).start()


class VllmProcess(EngineProcess):
    """One vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`) for one served version."""

    KIND = "vllm"

    def interpreter(self) -> Path:
        return resolve_python(self.cfg)

    def command(self, python: Path, port: int) -> list[str]:
        c = self.cfg
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--tensor-parallel-size", str(c.tensor_parallel_size),
                "--pipeline-parallel-size", str(c.pipeline_parallel_size),
                *ENGINE_ARGS.get(("vllm", self.device), ()), *c.extra_args]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        if self.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reserves far more
        return {**env, **self.cfg.env}

    def failure_hint(self) -> str:
        """What the engine's log says about a worker that died, with the fix where one is known."""
        text = self.log_text()
        if "exit code: -4" in text:
            return (f"\na vLLM worker died of SIGILL (illegal instruction; log {self.log_path}). On a CPU with AMX, "
                    "vLLM 0.32's kernels need the AMX permission that the environment `make vllm` builds requests "
                    "at startup: use it (serving.python: .venv-vllm/bin/python) or copy "
                    "infra/vllm/amx_permission.pth into the site-packages of serving.python")
        died = [line for line in text.splitlines() if "died unexpectedly" in line]
        return f"\n{died[-1].strip()} (log {self.log_path})" if died else ""


class RanksProcess(EngineProcess):
    """npuflow's own engine on tp x pp ranks (one device each, in the guard's process group) for one served
    version: rank 0 serves the npuflow OpenAI API on its lock-step engine (serving/ranks.py), the others follow it."""

    KIND = "npuflow-ranks"

    def __init__(self, cfg: ServingConfig, model_dir: Path, served_name: str, device: str, dtype: str,
                 max_model_len: int, log_path: Path, *, graph: bool, max_batch: int, kv_cache_gib: float | None,
                 max_tokens_limit: int, max_request_s: float):
        super().__init__(cfg, model_dir, served_name, device, dtype, max_model_len, log_path)
        self.graph, self.max_batch, self.kv_cache_gib = graph, max_batch, kv_cache_gib
        self.max_tokens_limit, self.max_request_s = max_tokens_limit, max_request_s

    def interpreter(self) -> Path:
        return Path(sys.executable)  # the ranks run npuflow itself, from this environment

    def command(self, python: Path, port: int) -> list[str]:
        c = self.cfg
        return [str(python), "-m", "npuflow.serving.ranks", "--ranks", str(c.ranks), str(self.model_dir),
                "--device", self.device, "--dtype", self.dtype, "--tp", str(c.tensor_parallel_size),
                "--pp", str(c.pipeline_parallel_size), "--port", str(port), "--served-name", self.served_name, "--max-len", str(self.max_model_len),
                "--max-batch", str(self.max_batch), "--max-tokens", str(self.max_tokens_limit),
                "--max-request-s", str(self.max_request_s), "--graph" if self.graph else "--eager",
                *(["--kv-cache-gib", str(self.kv_cache_gib)] if self.kv_cache_gib else [])]

    def env(self) -> dict[str, str]:
        from npuflow.runtime.pipeline import rank_env

        return {**rank_env(self.cfg.ranks, self.device), **self.cfg.env}

    def failure_hint(self) -> str:
        """The first error a rank printed, if any."""
        from npuflow.runtime.pipeline import rank_failure

        text = self.log_text()
        return f"\n{rank_failure(text)} (log {self.log_path})" if "Error" in text else ""


class RemoteRun:
    """One request streaming from the engine: the events of generation.Run, fed by a task."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.usage: dict[str, int] | None = None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # closes the upstream response: vLLM aborts the request

    async def next(self) -> tuple[str, Any]:
        return await self.queue.get()


class RemoteEngine:
    """A served version's engine at a URL (vLLM, or npuflow's own tp x pp ranks: serving/ranks.py): where it
    answers, under which model name, and how to reach it."""

    def __init__(self, url: str, served_name: str, process: EngineProcess | None = None,
                 request_timeout_s: float = 600.0, kind: str = "vllm"):
        self.url, self.served_name, self.process = url.rstrip("/"), served_name, process
        self.kind = process.KIND if process is not None else kind
        self.slowdown_s = 0.0  # tests and rehearsals: sleep before each chunk (see ServeOptions)
        self.timeout = httpx.Timeout(request_timeout_s, connect=10.0)
        self.client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.restarts = 0
        self.state = "serving"

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self.client is None or self._loop is not loop:
            self.client, self._loop = httpx.AsyncClient(timeout=self.timeout), loop
        return self.client

    def start(self, prompt_ids: list[int], body: dict[str, Any]) -> RemoteRun:
        """Send one completion upstream (body: OpenAI completion fields; model and prompt are set here)."""
        run = RemoteRun(prompt_ids)
        payload = {**body, "model": self.served_name, "prompt": prompt_ids, "stream": True,
                   "stream_options": {"include_usage": True}}
        run.task = asyncio.ensure_future(self._stream(run, payload))
        return run

    async def _stream(self, run: RemoteRun, payload: dict[str, Any]) -> None:
        put = run.queue.put_nowait
        try:
            async with self._client().stream("POST", f"{self.url}/v1/completions", json=payload) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:500]
                    put(("error", f"the engine answered {resp.status_code}: {text}"))
                    return
                finish = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        put(("error", f"the engine failed: {chunk['error']}"))
                        return
                    if chunk.get("usage"):
                        run.usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        if not choice.get("text") and choice.get("finish_reason"):  # the closing chunk: no token
                            finish = choice["finish_reason"]
                            continue
                        if self.slowdown_s:
                            await asyncio.sleep(self.slowdown_s)
                        put(("token", choice.get("text") or ""))
                        finish = choice.get("finish_reason") or finish
                put(("done", finish or "stop"))
        except asyncio.CancelledError:
            raise
        except (httpx.HTTPError, ValueError, OSError) as err:
            put(("error", f"the engine at {self.url} is unreachable or broke off: {type(err).__name__}: {err}"))

    def alive(self) -> bool:
        return self.process is None or self.process.alive()

    def health(self) -> dict[str, Any]:
        p = self.process
        return {"kind": self.kind, "url": self.url, "served_model_name": self.served_name, "state": self.state,
                "pid": p.proc.pid if p and p.proc else None, "managed": p is not None, "restarts": self.restarts,
                "alive": self.alive(), "stalled": False}

    def restart(self) -> None:
        """Start the engine process again (a managed engine only); raises when it does not come up."""
        if self.process is None:
            raise NpuflowError(f"the engine at {self.url} is not started by npuflow: it cannot be restarted here")
        self.state = "restarting"
        self.process.stop()
        self.url = self.process.start()
        self.restarts += 1
        self.state = "serving"

    def close(self) -> None:
        self.state = "stopped"
        if self.process is not None:
            self.process.stop()
        client, self.client = self.client, None
        if client is not None and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(client.aclose(), self._loop)


def connect(url: str, version: str, kind: str = "vLLM") -> tuple[str, str]:
    """An engine someone else runs: its URL (`{version}` filled in) and the model name it serves."""
    url = url.replace("{version}", version).rstrip("/")
    try:
        resp = httpx.get(f"{url}/v1/models", timeout=10)
        resp.raise_for_status()
        names = [m["id"] for m in resp.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError) as err:
        raise NpuflowError(f"the {kind} engine at {url} (serving.url) does not answer GET /v1/models: {err}") from None
    if not names:
        raise NpuflowError(f"the {kind} engine at {url} serves no model")
    return url, names[0]

