"""`npuflow serve` and `npuflow rollback` on a registry made by two real releases, over real sockets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from npuflow.core.config import parse_config
from npuflow.core.names import Alias
from npuflow.core.settings import Settings
from npuflow.registry import client as registry
from npuflow.serving.app import create_app
from npuflow.serving.loading import registry_pool
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool
from tests.conftest import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
NAME = "tiny-llama"
LENIENT_GATES = {"ppl_delta_pct_max": 100.0, "top1_agreement_min": 0.5, "kl_divergence_max": 5.0}
LENIENT_PROMOTION = {"ppl_regression_pct": 1000.0, "top1_drop_max": 1.0}


def make_config(source: str, **sections):
    """A demo-like config with the shortest evaluation and benchmark (serving needs versions, not figures)."""
    data = {
        "name": NAME,
        "source": {"uri": source},
        "validation": {"max_tokens": 512, "seq_len": 64, "gates": LENIENT_GATES},
        "benchmark": {"input_len": 16, "output_len": 4, "warmup": 0, "iterations": 1,
                      "tpot_regression_pct": 1000.0},
        "promotion": LENIENT_PROMOTION,
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return parse_config(data)


@pytest.fixture(scope="module")
def released(prefect_harness, tiny_model_dir, tmp_path_factory) -> Path:
    """Two releases: v1 (embeddings and lm_head quantized too), then v2 (the demo's quantization) promoted
    over it. Registry: champion v2, previous v1, candidate v2. Returns that NPUFLOW_HOME."""
    from npuflow.flows.release import release

    home = tmp_path_factory.mktemp("serve") / ".npuflow"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home.parent)
        mp.setenv("NPUFLOW_HOME", str(home))
        for k in ("MLFLOW_TRACKING_URI", "NPUFLOW_STORE_URI", "NPUFLOW_TRACKING_URI"):
            mp.delenv(k, raising=False)
        src = tiny_model_dir.as_uri()
        first = release(make_config(src, quantization={"ignore": []}))
        second = release(make_config(src))
    assert (first.version, second.version, second.decision) == ("1", "2", "promote"), second.reasons
    return home


@pytest.fixture
def home(released, tmp_path, monkeypatch) -> Path:
    """A private copy of the registry (the sqlite file) over the shared artifacts: a test may move aliases."""
    h = tmp_path / "home" / ".npuflow"
    h.mkdir(parents=True)
    shutil.copy2(released / "mlflow.db", h / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPUFLOW_HOME", str(h))
    monkeypatch.setenv("NPUFLOW_STORE_URI", (released / "artifacts").as_uri())
    for k in ("MLFLOW_TRACKING_URI", "NPUFLOW_TRACKING_URI", "NPUFLOW_SERVE_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return h


def client():
    return registry.client(Settings().resolved_tracking_uri)


def options(**kw) -> ServeOptions:
    s = Settings()
    return ServeOptions(name=NAME, tracking_uri=s.resolved_tracking_uri, store_uri=s.resolved_store_uri,
                        cache_dir=s.cache_dir, **kw)


@contextmanager
def serving(opts: ServeOptions) -> Iterator[tuple[str, ModelPool]]:
    """uvicorn in a thread on 127.0.0.1 and a free port, the pool loaded first (as `npuflow serve` does)."""
    import uvicorn

    pool = registry_pool(opts)
    pool.reload()
    server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}", pool
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def complete(http: httpx.Client, url: str, token: str | None = None, **body) -> httpx.Response:
    payload = {"model": NAME, "prompt": "the cat", "max_tokens": 2, "temperature": 0, **body}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return http.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=60)


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    """{(sorted label items): value} of one sample name in Prometheus text."""
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name}


def test_champion_and_challenger_split_traffic_by_weight_and_weights_change_at_run_time(home):
    client().set_registered_model_alias(NAME, Alias.CANDIDATE, "1")  # challenger v1 beside champion v2
    with serving(options(champion_weight=50, challenger_weight=50, token="t0k")) as (url, _pool), \
            httpx.Client() as http:
        health = http.get(f"{url}/health").json()
        assert health["champion"]["version"] == "2" and health["challenger"]["version"] == "1"
        assert health["challenger"]["status"] == "serving"
        assert health["weights"] == {"champion": 50, "challenger": 50}

        with ThreadPoolExecutor(4) as ex:  # 200 requests, 4 at a time
            responses = list(ex.map(lambda _: complete(http, url, "t0k"), range(200)))
        assert all(r.status_code == 200 for r in responses)
        counts = Counter(r.headers["x-model-version"] for r in responses)
        assert set(counts) == {"1", "2"} and all(80 <= n <= 120 for n in counts.values()), counts
        assert all(r.json()["choices"][0]["text"] for r in responses)

        text = http.get(f"{url}/metrics").text
        requests = metric_samples(text, "npuflow_serve_requests_total")
        for version, n in counts.items():
            labels = (("model", NAME), ("version", version))
            assert requests[labels] == n
            assert metric_samples(text, "npuflow_serve_ttft_seconds_count")[labels] == n
            assert metric_samples(text, "npuflow_serve_tpot_seconds_count")[labels] == n  # 1 interval each
        weights = metric_samples(text, "npuflow_serve_route_weight")
        assert weights[(("model", NAME), ("role", "challenger"), ("version", "1"))] == 50

        # shift all traffic to the champion at run time (admin needs the token too)
        assert http.post(f"{url}/admin/weights", json={"challenger": 0}).status_code == 401
        r = http.post(f"{url}/admin/weights", json={"champion": 100, "challenger": 0},
                      headers={"authorization": "Bearer t0k"})
        assert r.status_code == 200 and r.json()["weights"] == {"champion": 100, "challenger": 0}
        assert {complete(http, url, "t0k").headers["x-model-version"] for _ in range(20)} == {"2"}
        # a request may still pin the challenger
        pinned = complete(http, url, "t0k", model=f"{NAME}@challenger")
        assert pinned.status_code == 200 and pinned.headers["x-model-version"] == "1"


def test_streaming_sends_openai_chunks_then_done_with_the_same_text(home):
    with serving(options()) as (url, _pool), httpx.Client() as http:
        whole = complete(http, url, max_tokens=12)
        assert whole.status_code == 200 and whole.headers["x-model-version"] == "2"
        body = whole.json()
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 12
        with http.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": NAME, "prompt": "the cat", "max_tokens": 12, "temperature": 0, "stream": True,
        }) as r:
            assert r.status_code == 200 and r.headers["x-model-version"] == "2"
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 3 and all(c["object"] == "text_completion" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
        # the event loop answers while the model is busy: /health returns with requests in flight
        with ThreadPoolExecutor(3) as ex:
            busy = [ex.submit(complete, http, url, max_tokens=200) for _ in range(3)]
            in_flight = 0
            while not all(f.done() for f in busy) and not in_flight:
                in_flight = http.get(f"{url}/health", timeout=5).json()["champion"]["in_flight"]
            assert all(f.result().status_code == 200 for f in busy)
        assert in_flight > 0
        # sampling: the same seed, the same text
        a, b = (complete(http, url, max_tokens=12, temperature=0.9, top_p=0.9, seed=7).json()
                for _ in range(2))
        assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_answering(home):
    with serving(options(token="s3cret", max_tokens_limit=64)) as (url, _pool), httpx.Client() as http:
        auth = {"authorization": "Bearer s3cret"}
        ok = {"model": NAME, "prompt": "the dog", "max_tokens": 2}
        cases = [
            (401, {}, json.dumps(ok)),  # no token
            (401, {"authorization": "Bearer wrong"}, json.dumps(ok)),
            (400, auth, json.dumps({"model": NAME, "max_tokens": 2})),  # no prompt
            (400, auth, json.dumps({**ok, "max_tokens": 0})),
            (400, auth, json.dumps({**ok, "max_tokens": 65})),  # over the configured limit
            (400, auth, json.dumps({**ok, "prompt": ["the", "dog"]})),
            (400, auth, json.dumps({**ok, "stream": "yes"})),
            (400, auth, json.dumps({**ok, "n": 3})),  # not supported: said so, not ignored
            (400, auth, json.dumps({**ok, "prompt": "the dog " * 200})),  # longer than the 256-token context
            (400, auth, "{'model': 'single quotes'}"),  # not JSON
            (400, auth, "[1, 2]"),  # JSON, not an object
            (404, auth, json.dumps({**ok, "model": "llama-9000"})),
            (413, auth, json.dumps({**ok, "prompt": "x" * 70_000})),  # over 64 KB
        ]
        for status, headers, raw in cases:
            r = http.post(f"{url}/v1/completions", content=raw, timeout=30,
                          headers={**headers, "content-type": "application/json"})
            assert r.status_code == status, (raw[:80], r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"], r.text
            assert r.headers["x-model-version"] == "2"
        assert http.get(f"{url}/v1/nothing-here", headers=auth).json()["error"]["type"] == "not_found_error"
        assert http.post(f"{url}/admin/reload").status_code == 401
        health = http.get(f"{url}/health")  # open: for load balancers and probes
        assert health.status_code == 200 and health.json()["status"] == "ok"
        good = http.post(f"{url}/v1/completions", json=ok, headers=auth, timeout=30)
        assert good.status_code == 200 and good.json()["choices"][0]["text"]
        errors = metric_samples(http.get(f"{url}/metrics").text, "npuflow_serve_errors_total")
        assert errors[(("model", NAME), ("type", "authentication_error"), ("version", "none"))] == 2


def test_challenger_that_fails_to_load_is_out_of_rotation_and_the_champion_serves(home):
    c = client()
    v1 = c.get_model_version(NAME, "1")
    # a version whose recorded artifact hash does not match its run's deployable (a tampered entry)
    bad = c.create_model_version(NAME, source=v1.source, run_id=v1.run_id,
                                 tags={**v1.tags, "artifact_sha256": "0" * 64})
    c.set_registered_model_alias(NAME, Alias.CANDIDATE, bad.version)
    with serving(options(champion_weight=50, challenger_weight=50)) as (url, _pool), httpx.Client() as http:
        health = http.get(f"{url}/health").json()
        chal = health["challenger"]
        assert health["status"] == "degraded" and health["champion"]["version"] == "2"
        assert chal["version"] == str(bad.version)
        assert chal["status"] == "out_of_rotation" and chal["weight"] == 0
        assert "does not match" in chal["reason"] and chal["requested_weight"] == 50
        assert {complete(http, url).headers["x-model-version"] for _ in range(20)} == {"2"}
        pinned = complete(http, url, model=f"{NAME}@challenger")
        assert pinned.status_code == 503 and "does not match" in pinned.json()["error"]["message"]

        # fixed in the registry (candidate -> v1) and reloaded: the challenger is back with its weight
        c.set_registered_model_alias(NAME, Alias.CANDIDATE, "1")
        state = http.post(f"{url}/admin/reload").json()
        assert state["challenger"]["version"] == "1" and state["challenger"]["weight"] == 50
        assert {complete(http, url).headers["x-model-version"] for _ in range(30)} == {"1", "2"}


# ---- rollback, through the CLI, against `npuflow serve` in its own process ------------------------------


def npuflow(*args: str, cwd: Path, env: dict[str, str] | None = None, **kw):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_",))}
    return subprocess.run([sys.executable, "-m", "npuflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**full, "PYTHONPATH": str(REPO), **(env or {})}, **kw)


@contextmanager
def serve_process(cwd: Path, token: str) -> Iterator[str]:
    (cwd / "tiny.yaml").write_text(f"name: {NAME}\nsource: {{uri: 'file:///unused'}}\n")
    port = free_port()
    log = open(cwd / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "npuflow.cli", "serve", "tiny.yaml", "--port", str(port)],
        cwd=cwd, stdout=log, stderr=log,
        env={**os.environ, "PYTHONPATH": str(REPO), "NPUFLOW_SERVE_TOKEN": token},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log_tail = (cwd / "serve.log").read_text()[-3000:]
                raise AssertionError(f"npuflow serve did not start: {log_tail}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_rollback_restores_previous_champion_and_the_running_server_follows(home, tmp_path):
    token = "rollback-token"
    with serve_process(tmp_path, token) as url, httpx.Client() as http:
        assert complete(http, url, token).headers["x-model-version"] == "2"

        proc = npuflow("rollback", NAME, "--reason", "garbled answers in canary", "--actor", "oncall",
                       "--server-url", url, "--json", cwd=tmp_path, env={"NPUFLOW_SERVE_TOKEN": token})
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["action"] == "rolled_back" and out["champion"] == "1" and out["rolled_back"] == "2"
        assert out["server"]["champion"] == "1"
        r = complete(http, url, token)
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        assert http.get(f"{url}/health").json()["challenger"] is None  # candidate (v2) went with it

        c = client()
        assert registry.aliases(c, NAME) == {"champion": "1"}
        v1, v2 = c.get_model_version(NAME, "1").tags, c.get_model_version(NAME, "2").tags
        assert v2["rollout"] == "rolled_back" and v2["rolled_back_to"] == "1"
        assert v2["rollout_reason"] == "garbled answers in canary" and v2["rolled_back_by"] == "oncall"
        assert v1["rollout"] == "restored" and v1["restored_from"] == "2"

        again = npuflow("rollback", NAME, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "already rolled back: version 1 is champion since version 2 was rolled back" in again.stderr
        assert registry.aliases(c, NAME) == {"champion": "1"}
        assert c.get_model_version(NAME, "2").tags["rolled_back_by"] == "oncall"  # unchanged
        assert complete(http, url, token).headers["x-model-version"] == "1"


def test_rollback_without_previous_fails_with_exit_1_and_changes_nothing(home, tmp_path):
    c = client()
    c.delete_registered_model_alias(NAME, Alias.PREVIOUS)
    before = registry.aliases(c, NAME)
    proc = npuflow("rollback", NAME, cwd=tmp_path)
    assert proc.returncode == 1
    assert ("npuflow: error: tiny-llama has no `previous` version to roll back to (champion is version 2)"
            in proc.stderr)
    assert registry.aliases(c, NAME) == before
    unknown = npuflow("rollback", "no-such-model", cwd=tmp_path)
    assert unknown.returncode == 1 and "no registered model 'no-such-model'" in unknown.stderr


# ---- the OpenAI API as the official client uses it; many users at once; clients that leave ----------


def test_the_official_openai_client_completes_and_chats_streaming_and_not(home):
    import openai

    with serving(options()) as (url, _pool):
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        done = oa.completions.create(model=NAME, prompt="the cat", max_tokens=8, temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
        streamed = oa.completions.create(model=NAME, prompt="the cat", max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
        assert chunks[-1].usage.completion_tokens == 8
        messages = [{"role": "system", "content": "answer in one sentence"},
                    {"role": "user", "content": "where does the cat live ?"}]
        chat = oa.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
        assert chat.usage.prompt_tokens > 10
        parts = list(oa.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
        assert parts[-1].choices[0].finish_reason == "length"
        ids = [m.id for m in oa.models.list().data]
        assert ids[:2] == [NAME, f"{NAME}@champion"]
        card = oa.models.retrieve(NAME)
        assert card.created > 1_600_000_000 and card.owned_by == "npuflow"
        with pytest.raises(openai.NotFoundError):
            oa.models.retrieve("gpt-4")


def test_concurrent_users_are_decoded_together(home):
    """16 users at once: the version's engine decodes many of them in the same steps (continuous
    batching), and each gets the answer it would get alone (greedy)."""
    with serving(options()) as (url, _pool), httpx.Client() as http:
        alone = complete(http, url, prompt="the dog", max_tokens=24).json()["choices"][0]["text"]
        with ThreadPoolExecutor(16) as ex:
            answers = list(ex.map(lambda i: complete(http, url, prompt="the dog", max_tokens=24), range(16)))
        assert all(a.status_code == 200 for a in answers)
        assert {a.json()["choices"][0]["text"] for a in answers} == {alone}
        engine = http.get(f"{url}/health").json()["champion"]["engine"]
        assert engine["peak_running"] >= 4 and engine["running"] == 0 and not engine["stalled"]


def test_a_client_that_leaves_frees_its_slot_and_others_are_answered(home):
    """A non-streaming request whose client gives up stops generating at the next step (the slowed
    challenger would otherwise run 200 steps of 50 ms); a fresh request is then answered."""
    with serving(options(challenger_alias=Alias.PREVIOUS, challenger_slowdown_ms=50)) as (url, _pool), \
            httpx.Client() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/v1/completions", json={"model": f"{NAME}@challenger", "prompt": "the cat",
                                                     "max_tokens": 200, "temperature": 0}, timeout=1.0)
        deadline = time.monotonic() + 5
        while http.get(f"{url}/health").json()["challenger"]["engine"]["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.get(f"{url}/health").json()["challenger"]["engine"]["running"] == 0
        fresh = complete(http, url, model=f"{NAME}@challenger", max_tokens=3)
        assert fresh.status_code == 200 and fresh.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(("body", "param"), [
    ({"seed": 2**64, "temperature": 1.0}, "seed"),
    ({"temperature": 1e-30}, "temperature"),
    ({"prompt": "the cat " * 400}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_bad_input_to_the_challenger_is_a_400_and_never_takes_it_out(home, body, param):
    with serving(options(challenger_alias=Alias.PREVIOUS)) as (url, _pool), httpx.Client() as http:
        r = complete(http, url, **{"model": f"{NAME}@challenger", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        health = http.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["challenger"]["status"] == "serving"
        assert complete(http, url, model=f"{NAME}@challenger").status_code == 200


def test_weights_swapped_in_the_store_after_the_release_are_not_served(home, released, tmp_path, monkeypatch):
    """Issue 13 hole 4: whoever could write the bucket could replace the quantized weights and their
    manifest consistently (files and hashes) and the server loaded them while /health showed the
    registered sha. The quantized manifest must be the one the deployable names."""
    from npuflow.core.artifacts import Deployable, QuantizedArtifact, sha256_file
    from npuflow.core.errors import IntegrityError
    from npuflow.serving.loading import load_version

    store = tmp_path / "store"
    shutil.copytree(released / "artifacts", store)  # a private copy of the bucket to tamper with
    monkeypatch.setenv("NPUFLOW_STORE_URI", store.as_uri())
    c = client()
    champion = registry.by_alias(c, NAME, Alias.CHAMPION)
    dep, _ = registry.deployable_of(c, champion)
    qdir = store / dep.quantized_key
    manifest = QuantizedArtifact.model_validate({**json.loads((qdir / "manifest.json").read_text()), "uri": "x"})
    name = next(n for n in manifest.files if n.endswith(".safetensors"))
    weights = qdir / name
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights...
    weights.write_bytes(bytes(data))
    files = {**manifest.files, name: manifest.files[name].model_copy(update={"sha256": sha256_file(weights)})}
    swapped = manifest.model_copy(update={"files": files})  # ...and a manifest that vouches for them
    (qdir / "manifest.json").write_bytes(swapped.manifest_bytes())
    assert isinstance(dep, Deployable) and swapped.manifest_sha256 != dep.quantized_manifest_sha256
    with pytest.raises(IntegrityError, match="not the one this version was registered with"):
        load_version(c, champion, options())
