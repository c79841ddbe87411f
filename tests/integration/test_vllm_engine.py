"""A real vLLM (CPU) behind the npuflow router: the champion on the npuflow engine, the challenger on vLLM,
from two real releases. Both answer the official openai client (completions and chat, streaming and
not); bad input is a 4xx that never takes the vLLM challenger out; a canary stage passes on the router's
metrics and promotes; rollback reloads; a slow vLLM challenger fails the canary; no engine process
survives the server. Needs `make vllm` (.venv-vllm); CI installs it before the tests."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from npuflow.flows.rollout import RolloutFailedError, rollout

from npuflow.core.config import ServingConfig
from npuflow.core.names import Alias
from npuflow.registry import client as registry
from npuflow.serving.remote import group_alive
from tests.integration.test_serve import NAME, client, make_config, options, serving

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
if not VLLM_PY.is_file():
    pytest.skip("the vLLM environment is absent: run `make vllm` (CI does)", allow_module_level=True)

W4A16_CT = {"scheme": "w4a16", "group_size": 128, "format": "compressed-tensors"}  # what vLLM CPU runs
VLLM = {"engine": "vllm", "python": str(VLLM_PY), "extra_args": ["--enforce-eager"], "startup_timeout_s": 400}
QUICK = {"min_duration_s": 1, "min_requests": 6, "max_duration_s": 60, "max_requests": 40}
TPOT_LIMIT = {"error_rate_max": 0.0, "ttft_regression_pct": None, "tpot_regression_pct": None,
              "tpot_ms_p95_max": 250}


@pytest.fixture(scope="module")
def released_vllm(prefect_harness, tiny_model_dir, tmp_path_factory) -> Path:
    """v1: the demo's W8A16 on the npuflow engine; v2: W4A16 compressed-tensors on vLLM. Registry: champion
    v1, candidate v2 (the challenger), no previous. Returns that NPUFLOW_HOME."""
    from npuflow.flows.release import release

    home = tmp_path_factory.mktemp("vllm") / ".npuflow"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home.parent)
        mp.setenv("NPUFLOW_HOME", str(home))
        for k in ("MLFLOW_TRACKING_URI", "NPUFLOW_STORE_URI", "NPUFLOW_TRACKING_URI"):
            mp.delenv(k, raising=False)
        src = tiny_model_dir.as_uri()
        first = release(make_config(src))
        second = release(make_config(src, quantization=W4A16_CT, serving=VLLM))
        assert (first.version, second.version) == ("1", "2"), second.reasons
        c = registry.client(f"sqlite:///{home}/mlflow.db")
        c.set_registered_model_alias(NAME, Alias.CHAMPION, "1")
        c.set_registered_model_alias(NAME, Alias.CANDIDATE, "2")
        if Alias.PREVIOUS in registry.aliases(c, NAME):
            c.delete_registered_model_alias(NAME, Alias.PREVIOUS)
    return home


@pytest.fixture
def home(released_vllm, tmp_path, monkeypatch) -> Path:
    import shutil

    h = tmp_path / "home" / ".npuflow"
    h.mkdir(parents=True)
    shutil.copy2(released_vllm / "mlflow.db", h / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPUFLOW_HOME", str(h))
    monkeypatch.setenv("NPUFLOW_STORE_URI", (released_vllm / "artifacts").as_uri())
    for k in ("MLFLOW_TRACKING_URI", "NPUFLOW_TRACKING_URI", "NPUFLOW_SERVE_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return h


def vllm_options(**kw):
    return options(serving=ServingConfig(**VLLM), **kw)


def config(stages):
    return make_config("file:///unused", quantization=W4A16_CT, serving=VLLM,
                       rollout={"stages": stages, "max_tokens": 4, "concurrency": 2})


def engine_group(health: dict, role: str) -> int:
    engine = health[role]["engine"]
    assert engine["kind"] == "vllm" and engine["alive"] and engine["managed"], engine
    return engine["pid"]


def gone(pgid: int, within_s: float = 30) -> bool:
    deadline = time.monotonic() + within_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not group_alive(pgid)


def ask_both_engines(url: str) -> None:
    """Completions and chat, streaming and not, with the official client, pinned to each role."""
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    for model, version in ((f"{NAME}@champion", "1"), (f"{NAME}@challenger", "2")):
        raw = oa.completions.with_raw_response.create(model=model, prompt="the cat", max_tokens=4, temperature=0)
        assert raw.headers["x-model-version"] == version
        done = raw.parse()
        assert done.model == model and done.choices[0].finish_reason in ("length", "stop")
        assert done.usage.prompt_tokens > 0 and 1 <= done.usage.completion_tokens <= 4
        chunks = list(oa.completions.create(model=model, prompt="the cat", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
        assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
        chat = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        streamed = list(oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                                   max_tokens=4, temperature=0, stream=True))
        assert streamed[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            chat.choices[0].message.content


BAD = [({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
       ({"prompt": [10 ** 6]}, "prompt"), ({"prompt": "x", "temperature": -1}, "temperature"),
       ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
       ({"prompt": "the cat " * 400, "max_tokens": 4}, "max_tokens")]


def bad_inputs_leave_the_challenger_in_rotation(http: httpx.Client, url: str) -> None:
    for body, param in BAD:
        r = http.post(f"{url}/v1/completions", json={"model": f"{NAME}@challenger", **body}, timeout=60)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, (body, r.text)
    r = http.post(f"{url}/v1/chat/completions", json={"model": f"{NAME}@challenger", "messages": "hi"}, timeout=60)
    assert r.status_code == 400
    health = http.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["challenger"]["status"] == "serving", health


def test_npuflow_champion_and_vllm_challenger_canary_promote_rollback_and_no_orphan(home, tmp_path):
    with serving(vllm_options(champion_weight=50, challenger_weight=50)) as (url, _pool), httpx.Client() as http:
        health = http.get(f"{url}/health").json()
        assert health["champion"]["engine"].get("kind") != "vllm" and health["challenger"]["version"] == "2"
        pgid = engine_group(health, "challenger")
        ask_both_engines(url)
        bad_inputs_leave_the_challenger_in_rotation(http, url)

        # a canary stage on the router's metrics passes, and the candidate (vLLM) becomes champion
        record = rollout(config([{"name": "canary", "weight": 50, **QUICK, "slo": TPOT_LIMIT}]), server_url=url)
        assert record.decision == "promoted" and [s.verdict.result for s in record.stages] == ["pass"]
        health = http.get(f"{url}/health").json()
        assert health["champion"]["version"] == "2" and engine_group(health, "champion") == pgid  # same engine
        r = http.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"

        # rollback: champion back to v1 (npuflow), the server reloads and the vLLM engine is stopped
        from tests.integration.test_serve import npuflow
        proc = npuflow("rollback", NAME, "--reason", "vllm canary rehearsal", "--server-url", url, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        health = http.get(f"{url}/health").json()
        assert health["champion"]["version"] == "1" and health["challenger"] is None
        r = http.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        assert gone(pgid), "the rolled-back version's vLLM processes are still running"
        assert registry.aliases(client(), NAME)[Alias.CHAMPION] == "1"


def test_a_slow_vllm_challenger_fails_the_canary_and_its_engine_dies_with_the_server(home):
    with serving(vllm_options(challenger_slowdown_ms=400)) as (url, _pool):
        pgid = engine_group(httpx.get(f"{url}/health").json(), "challenger")
        with pytest.raises(RolloutFailedError, match=r"rolled_back.*tpot p95"):
            rollout(config([{"name": "canary", "weight": 50, **QUICK, "slo": TPOT_LIMIT}]), server_url=url)
        health = httpx.get(f"{url}/health").json()
        assert health["weights"]["challenger"] == 0 and health["champion"]["version"] == "1"
        assert health["status"] in ("ok", "degraded")
        engine_url = health["challenger"]["engine"]["url"]

        # a client that leaves mid-stream: the router closes the upstream request and vLLM aborts it
        body = {"model": f"{NAME}@challenger", "prompt": "the cat", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        assert wait_until(lambda: httpx.get(f"{url}/health").json()["challenger"]["in_flight"] == 0)
        assert wait_until(lambda: running(engine_url) == 0), "vLLM still runs the abandoned request"
    assert gone(pgid, 5), "the server stopped but its vLLM engine lives on"


def running(engine_url: str) -> float:
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def wait_until(cond, within_s: float = 20) -> bool:
    deadline = time.monotonic() + within_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.2)
    return cond()


def test_a_challenger_engine_that_dies_leaves_rotation_and_the_champion_answers(home):
    with serving(vllm_options(champion_weight=50, challenger_weight=50)) as (url, _pool), httpx.Client() as http:
        pgid = engine_group(http.get(f"{url}/health").json(), "challenger")
        os.killpg(pgid, 9)
        deadline = time.monotonic() + 30
        while http.get(f"{url}/health").json()["challenger"]["status"] == "serving":
            assert time.monotonic() < deadline, "the dead engine is still in rotation"
            time.sleep(0.2)
        health = http.get(f"{url}/health").json()
        assert "exited" in health["challenger"]["reason"] and health["weights"]["challenger"] == 0
        answers = [http.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "the cat", "max_tokens": 2})
                   for _ in range(6)]
        assert all(r.status_code == 200 and r.headers["x-model-version"] == "1" for r in answers)
        r = http.post(f"{url}/v1/completions", json={"model": f"{NAME}@challenger", "prompt": "x"})
        assert r.status_code == 503 and "exited" in r.json()["error"]["message"]
    assert gone(pgid, 5)
    assert subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 1


def test_npuflow_serve_with_the_configs_serving_section_leaves_no_engine_when_sigkilled(home, tmp_path):
    """`npuflow serve CONFIG` in its own process (the config's serving: section), SIGKILLed: no chance to
    stop anything itself, and still the guard takes the vLLM process group down with it."""
    import json
    import sys

    from tests.conftest import free_port

    cfg = {"name": NAME, "source": {"uri": "file:///unused"}, "quantization": W4A16_CT, "serving": VLLM}
    (tmp_path / "serve.yaml").write_text(json.dumps(cfg))  # YAML is a superset of JSON
    port, log = free_port(), (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "npuflow.cli", "serve", "serve.yaml", "--port", str(port),
                             "--challenger-weight", "50"], cwd=tmp_path, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(url) or proc.poll() is not None, 400) and proc.poll() is None, \
            (tmp_path / "serve.log").read_text()[-3000:]
        health = httpx.get(f"{url}/health").json()
        pgid = engine_group(health, "challenger")
        r = httpx.post(f"{url}/v1/completions", json={"model": f"{NAME}@challenger", "prompt": "the cat",
                                                      "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
    finally:
        proc.kill()
        proc.wait(30)
        log.close()
    assert gone(pgid, 40), "npuflow serve was SIGKILLed and its vLLM engine lives on"


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
