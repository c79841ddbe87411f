"""`npuflow serve --model DIR --tp 2 / --pp 2`: npuflow's engine on torchrun-style ranks (gloo) behind the router,
answering as the single-device server does; a rank that dies restarts the champion; bad layouts fail first."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from tests.conftest import free_port

pytestmark = pytest.mark.integration
PROMPTS = ["the cat sat on", "a dog ran to the", "once upon a time", "the river"]


@pytest.fixture(scope="module")
def w8(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("serve-w8a16")
    quantize_dir(tiny_model_dir, d, QuantizationConfig(scheme="w8a16"))
    return d


@contextlib.contextmanager
def serve(model: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
          ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`npuflow serve --model` in its own process until /health answers; SIGTERM afterwards, and no rank left."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # the ranks share 2 cores (test_tensor_parallel.py)
    log = open(cwd / f"serve-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "npuflow.cli", "serve", "--model", str(model), "--port", str(port),
                             "--name", "tiny", "--eager", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (cwd / f"serve-{port}.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (cwd / f"serve-{port}.log").read_text()[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).json()["champion"]["status"] == "serving":
                    break
            time.sleep(0.5)
        yield url, proc
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"engine processes left after the server stopped: {[p.pid for p in alive]}"


def answers(url: str) -> list:
    """What the clients see, text and usage: greedy completions of several prompts one at a time, one with stop
    strings, one streamed (its chunks joined), a chat, and 8 users at once (decoded together: prefills of several
    prompts in one call, the lock-step MANY message) who each get the answer they get alone.

    One at a time, because a batch's rows are computed by other kernels than a single row (their float32
    rounding differs by ~1e-7), and the demo model has near-ties (which animal a new sentence is about) that
    such a difference can flip, on one device as on two: only "the dog" is checked under load, as in
    test_serve.py."""
    def one(body: dict):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=120)
        assert r.status_code == 200, r.text
        c = r.json()
        return c["choices"][0]["text"], c["choices"][0]["finish_reason"], c["usage"]

    out = [one({"prompt": p, "max_tokens": 24}) for p in PROMPTS]
    out.append(one({"prompt": PROMPTS[0], "max_tokens": 24, "stop": [" the", "."]}))
    alone = one({"prompt": "the dog", "max_tokens": 24})
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, [{"prompt": "the dog", "max_tokens": 24}] * 8))
    assert together == [alone] * 8
    out.append(alone)
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 24, "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    out.append(text)
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": "the cat"}]})
    assert chat.status_code == 200, chat.text
    out.append(chat.json()["choices"][0]["message"]["content"])
    return out


@pytest.fixture(scope="module")
def single(w8: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    with serve(w8, tmp_path_factory.mktemp("serve-single")) as (url, _):
        return answers(url)


def engine_of(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()["champion"]["engine"]


def ranks_of(group: int) -> list[psutil.Process]:
    """The rank processes under the engine's guard (its group leader) and launcher (`--ranks N`)."""
    cmds = [(p, p.cmdline()) for p in psutil.Process(group).children(recursive=True)]
    return [p for p, cmd in cmds if "npuflow.serving.ranks" in cmd and "--ranks" not in cmd]


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2"), ("--tp", "2", "--pp", "2")],
                         ids=["tp2", "pp2", "tp2-pp2"])
def test_ranks_behind_the_router_answer_as_one_device_does(w8, single, tmp_path, layout):
    with serve(w8, tmp_path, *layout) as (url, _):
        engine = engine_of(url)
        assert engine["kind"] == "npuflow-ranks" and engine["managed"] and engine["alive"], engine
        assert len(ranks_of(engine["pid"])) == 2 * (len(layout) // 2)
        assert answers(url) == single


def test_a_rank_that_dies_restarts_the_champion_on_new_ranks(w8, single, tmp_path):
    with serve(w8, tmp_path, "--tp", "2") as (url, _):
        engine = engine_of(url)
        follower = max(ranks_of(engine["pid"]), key=lambda p: p.pid)
        follower.kill()  # SIGKILL one rank: rank 0's next collective fails, the group exits, the pool restarts it
        wait_restarted(url, engine["pid"], 120)
        assert not psutil.pid_exists(engine["pid"]) or psutil.Process(engine["pid"]).status() == psutil.STATUS_ZOMBIE
        assert answers(url) == single


def wait_restarted(url: str, old_pid: int, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(httpx.HTTPError, KeyError):
            now = engine_of(url)
            if now["restarts"] >= 1 and now["alive"] and now["pid"] != old_pid:
                return now
        assert time.monotonic() < deadline, engine_of(url)
        time.sleep(0.5)


def test_a_rank_that_hangs_fails_the_step_and_the_champion_is_restarted(w8, single, tmp_path):
    """A follower SIGSTOPped (hung, not dead): rank 0's next call to it fails after the collective timeout
    instead of holding every request forever; rank 0 exits, the version restarts on new ranks."""
    with serve(w8, tmp_path, "--tp", "2", env={"NPUFLOW_COLLECTIVE_TIMEOUT_S": "10"}) as (url, _):
        engine = engine_of(url)
        follower = max(ranks_of(engine["pid"]), key=lambda p: p.pid)
        follower.suspend()
        try:
            t = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": "the cat", "max_tokens": 8, "temperature": 0})
            assert r.status_code >= 500 and time.monotonic() - t < 60, r.text
            wait_restarted(url, engine["pid"], 120)
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                follower.resume()
        assert answers(url) == single
    log = next((tmp_path / ".npuflow" / "cache" / "engines").glob("*.log")).read_text()
    assert "the ranks are out of step; exiting so that the group is restarted" in log


@pytest.mark.parametrize(("args", "says"), [(("--tp", "3"), "num_attention_heads = 4 does not split over tp = 3"),
                                            (("--pp", "5"), "num_hidden_layers = 4 does not split over pp = 5"),
                                            (("--tp", "0"), "--tp and --pp must be >= 1")])
def test_a_layout_that_does_not_divide_the_model_fails_before_any_rank_starts(w8, tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "npuflow.cli", "serve", "--model", str(w8), "--port", str(free_port()),
                        *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert says in r.stderr + r.stdout, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / ".npuflow" / "cache" / "engines").exists() or not any(
        (tmp_path / ".npuflow" / "cache" / "engines").iterdir())


def test_graph_mode_ranks_answer_as_the_eager_single_device(w8, single, tmp_path):
    """--graph: each rank compiles its decode step (torch.compile; the collectives and, in a pipeline, the
    point-to-point sends stay in the graph or break it) and the answers are the eager single device's."""
    with serve(w8, tmp_path, "--tp", "2", "--graph") as (url, _):
        assert answers(url) == single


def test_ranks_started_by_torchrun_serve_through_serving_url(w8, single, tmp_path):
    """The two-host recipe on one host: torchrun starts the ranks (a static rendezvous: rank 0 is on the first
    node), the router connects to rank 0 at serving.url instead of starting an engine."""
    import threading

    import uvicorn

    from npuflow.core.config import ServingConfig
    from npuflow.serving.app import create_app
    from npuflow.serving.loading import directory_pool
    from npuflow.serving.options import ServeOptions

    port = free_port()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    log = open(tmp_path / "torchrun.log", "wb")
    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
                              "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                              "-m", "npuflow.serving.ranks", str(w8), "--tp", "2", "--port", str(port),
                              "--served-name", "tiny-on-ranks", "--eager"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert ranks.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        workers = psutil.Process(ranks.pid).children(recursive=True)
        opts = ServeOptions(name="tiny", tracking_uri="", store_uri="", cache_dir=tmp_path,
                            serving=ServingConfig(url=f"http://127.0.0.1:{port}"))
        pool = directory_pool(opts, w8, "cpu", graph=False)
        pool.reload()
        server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        try:
            url = f"http://127.0.0.1:{server.config.port}"
            engine = engine_of(url)
            assert engine["kind"] == "npuflow" and not engine["managed"], engine
            assert engine["served_model_name"] == "tiny-on-ranks"
            assert answers(url) == single
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            pool.close()
        assert ranks.poll() is None, "closing the router must leave an engine it did not start running"
    finally:
        ranks.send_signal(signal.SIGTERM)  # torchrun stops its workers
        ranks.wait(60)
        log.close()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
