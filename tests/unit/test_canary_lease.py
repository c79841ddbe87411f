"""Issue 13, hole 5: canary weights are a lease the rollout renews (a rollout that dies gives all traffic back
to the champion within the lease), the server a rollout starts requires a token, and `npuflow serve` refuses
a non-loopback address without one. Real pools over the demo model, real HTTP (uvicorn), the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from npuflow.cli.serve import is_loopback
from npuflow.core.config import StageConfig
from npuflow.core.names import Role
from npuflow.serving import canary
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import LEASE_EXPIRED, ModelPool
from tests.unit.test_pool import Registry, _pool

REPO = Path(__file__).resolve().parents[2]
LEASE = 0.3  # seconds: short enough to wait out in a test



def _picks(pool: ModelPool, n: int = 60) -> set[str]:
    labels = set()
    for _ in range(n):
        _, lm = pool.acquire()
        labels.add(lm.label)
        pool.release(lm)
    return labels


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- the pool: a lease that lapses, one that is renewed, weights without a lease ------------------------


def test_a_lease_not_renewed_returns_all_traffic_to_the_champion_without_any_request(demo_model) -> None:
    pool = _pool(Registry(demo_model, champion="1", candidate="2"))
    pool.reload()
    pool.set_weights({Role.CHAMPION: 50, Role.CHALLENGER: 50}, lease_s=LEASE)
    assert pool.effective_weights() == {Role.CHAMPION: 50, Role.CHALLENGER: 50}
    assert pool.health()["weights_lease"]["state"] == "active"
    assert _picks(pool) == {"1", "2"}
    time.sleep(LEASE + 0.3)
    # nothing asked the pool anything meanwhile: the timer ended the lease
    assert pool.weights == {Role.CHAMPION: 50, Role.CHALLENGER: 0}
    assert pool.events[-1]["event"] == LEASE_EXPIRED == "canary weight lease expired"
    health = pool.health()
    assert health["weights"] == {Role.CHAMPION: 50, Role.CHALLENGER: 0}
    assert health["weights_lease"]["state"] == "expired" and health["weights_lease"]["reason"] == LEASE_EXPIRED
    assert health["weights_lease"]["challenger_weight_was"] == 50
    assert _picks(pool) == {"1"}
    assert pool.acquire(Role.CHALLENGER)[1].label == "2"  # still loaded: a pinned request is answered


def test_a_lapsed_full_stage_gives_the_champion_all_traffic(demo_model) -> None:
    pool = _pool(Registry(demo_model, champion="1", candidate="2"))
    pool.reload()
    pool.set_weights({Role.CHAMPION: 0, Role.CHALLENGER: 100}, lease_s=LEASE)
    assert _picks(pool, 20) == {"2"}
    time.sleep(LEASE + 0.3)
    assert pool.effective_weights() == {Role.CHAMPION: 100, Role.CHALLENGER: 0}
    assert _picks(pool, 20) == {"1"}


def test_renewing_keeps_the_lease_and_weights_without_one_stand(demo_model) -> None:
    pool = _pool(Registry(demo_model, champion="1", candidate="2"))
    pool.reload()
    for _ in range(6):  # 1.2 s: four leases long, renewed every two thirds of one
        pool.set_weights({Role.CHAMPION: 50, Role.CHALLENGER: 50}, lease_s=LEASE)
        time.sleep(LEASE * 2 / 3)
        assert pool.effective_weights()[Role.CHALLENGER] == 50
    events = [e["event"] for e in pool.events]
    assert LEASE_EXPIRED not in events and events.count("weights") == 1  # renewals are not events
    pool.set_weights({Role.CHALLENGER: 30})  # without lease_s: a person's permanent choice
    assert pool.health()["weights_lease"] is None
    time.sleep(LEASE + 0.3)
    assert pool.effective_weights() == {Role.CHAMPION: 50, Role.CHALLENGER: 30}
    assert _picks(pool) == {"1", "2"}


# ---- over HTTP: the embedded server the rollout starts ------------------------------------------------


@pytest.fixture
def embedded(demo_model) -> Iterator[tuple[str, ModelPool]]:
    """The rollout's embedded server (canary.embedded_server) over a pool of the demo model; (url, pool)."""
    reg, pools = Registry(demo_model, champion="1", candidate="2"), []

    def make_pool(opts: ServeOptions) -> ModelPool:
        pools.append(ModelPool(opts, resolve=reg.resolve, load=reg.load, where="the test registry"))
        return pools[0]

    opts = ServeOptions(name="tiny", tracking_uri="memory", store_uri="memory", cache_dir=Path("/nonexistent"))
    with canary.embedded_server(opts, make_pool=make_pool) as url:
        yield url, pools[0]


@pytest.mark.parametrize(("lease", "words"), [
    (0, "greater than 0"), (-5, "greater than 0"), ("soon", "valid number"), (True, "valid number"),
    (10**6, "less than or equal to 86400"),
])
def test_admin_weights_refuses_a_bad_lease_naming_the_field(embedded, lease, words) -> None:
    url, pool = embedded
    r = httpx.post(f"{url}/admin/weights", json={"champion": 50, "challenger": 50, "lease_s": lease},
                   headers=canary._headers(url), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "lease_s" and "lease_s" in err["message"] and words in err["message"]
    assert pool.weights == {Role.CHAMPION: 100, Role.CHALLENGER: 0}  # nothing applied


def test_admin_weights_with_a_lease_lapses_unless_posted_again(embedded) -> None:
    url, _ = embedded
    auth = canary._headers(url)
    body = {"champion": 90, "challenger": 10, "lease_s": LEASE}
    r = httpx.post(f"{url}/admin/weights", json=body, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["weights"] == {"champion": 90, "challenger": 10} and r.json()["lease"]["state"] == "active"
    for _ in range(4):  # renewed by posting again
        time.sleep(LEASE / 2)
        assert httpx.post(f"{url}/admin/weights", json=body, headers=auth, timeout=30).status_code == 200
    assert httpx.get(f"{url}/health", timeout=30).json()["weights"]["challenger"] == 10
    time.sleep(LEASE + 0.3)
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["weights"] == {"champion": 90, "challenger": 0}
    assert health["weights_lease"]["reason"] == "canary weight lease expired"
    assert health["events"][-1]["event"] == "canary weight lease expired"
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'npuflow_serve_route_weight{model="tiny",role="challenger",version="2"} 0.0' in metrics


def test_the_embedded_server_requires_its_token_and_the_rollouts_requests_send_it(embedded) -> None:
    url, _ = embedded
    for method, path, body in (("POST", "/v1/completions", {"model": "tiny", "prompt": "the cat", "max_tokens": 2}),
                               ("POST", "/admin/weights", {"champion": 0, "challenger": 100}),
                               ("POST", "/admin/reload", None), ("GET", "/v1/models", None)):
        r = httpx.request(method, f"{url}{path}", json=body, timeout=30)
        assert r.status_code == 401, (path, r.text)
    token = canary._tokens[url]
    assert len(token) >= 32 and canary._headers(url) == {"authorization": f"Bearer {token}"}
    # every call the rollout makes (tasks/rollout.py): health, weights, stats, load, reload
    assert canary.health(url)["challenger"]["status"] == "serving"
    stage = StageConfig(name="canary", weight=50, min_duration_s=0, min_requests=2, max_requests=8,
                        max_duration_s=60)
    assert canary.set_weights(url, 50, 50, lease_s=canary.lease_for(stage))["weights"]["challenger"] == 50
    load = canary.run_load(url, "tiny", ["the cat sees", "a dog runs"], stage, max_tokens=2, concurrency=2)
    assert load.failed == 0 and sum(load.by_role.values()) == load.sent > 0
    stats = canary.read_stats(url, "tiny")
    assert stats["1"].requests + stats["2"].requests == load.sent
    assert canary.set_weights(url, 100, 0)["weights"] == {"champion": 100, "challenger": 0}
    assert canary.reload(url)["errors"] == []
    assert canary.health(url)["weights_lease"] is None  # the rollback's weights hold no lease


def test_the_rollout_renews_its_lease_and_a_sigkilled_rollout_leaves_no_canary_traffic(embedded) -> None:
    """A rollout process sets canary weights (as stage_task does) and is SIGKILLed: the server, which
    outlives it, returns all traffic to the champion once the lease passes."""
    url, pool = embedded
    lease = 1.0
    script = ("import sys, time\nfrom npuflow.serving import canary\n"
              f"canary.set_weights(sys.argv[1], 50, 50, lease_s={lease})\ntime.sleep(600)\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NPUFLOW_")},
           "NPUFLOW_SERVE_TOKEN": canary._tokens[url], "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, url], env=env, cwd=REPO)
    try:
        _wait_for(lambda: pool.effective_weights()[Role.CHALLENGER] == 50, 60, "the rollout's weights")
        time.sleep(2.5 * lease)  # alive: renewed every third of the lease, never lapses
        assert proc.poll() is None
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["weights"]["challenger"] == 50 and health["weights_lease"]["state"] == "active"
        assert LEASE_EXPIRED not in [e["event"] for e in health["events"]]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _wait_for(lambda: pool.weights[Role.CHALLENGER] == 0, lease + 1.0, "the lease to lapse")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["weights"] == {"champion": 50, "challenger": 0}
    assert health["weights_lease"]["reason"] == LEASE_EXPIRED
    assert _picks(pool) == {"1"}


def test_the_rollouts_lease_is_one_analysis_window() -> None:
    assert canary.lease_for(StageConfig(name="canary", weight=10, min_duration_s=120, max_duration_s=600)) == 120
    assert canary.lease_for(StageConfig(name="canary", weight=10, min_duration_s=1)) == canary.LEASE_MIN_S
    assert canary.DEFAULT_LEASE_S == 60


# ---- `npuflow serve` on a non-loopback address --------------------------------------------------------


def _serve(tmp_path: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUFLOW_", "MLFLOW_"))}
    env.update({"PYTHONPATH": str(REPO), "NPUFLOW_HOME": str(tmp_path / ".npuflow"),
                **({"NPUFLOW_SERVE_TOKEN": token} if token else {})})
    return subprocess.run([sys.executable, "-m", "npuflow.cli", "serve", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_refuses_a_non_loopback_address_without_a_token_before_loading(tmp_path) -> None:
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    proc = _serve(tmp_path, "--host", "0.0.0.0", "--model", str(missing), "--port", "1")
    assert proc.returncode == 2, proc.stderr
    assert "npuflow: error: refusing to bind 0.0.0.0 without a token" in proc.stderr
    assert "NPUFLOW_SERVE_TOKEN" in proc.stderr and "--token" in proc.stderr
    assert proc.stderr.count("npuflow: error:") == 1 and "no-such-model" not in proc.stderr
    with_token = _serve(tmp_path, "--host", "0.0.0.0", "--model", str(missing), "--port", "1", token="s3cret")
    assert with_token.returncode != 0 and "refusing to bind" not in with_token.stderr  # got as far as loading


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("serve.example.com", False),
])
def test_loopback_addresses(host, loopback) -> None:
    assert is_loopback(host) is loopback


def test_a_server_that_refuses_the_lease_field_is_named_as_too_old(tmp_path) -> None:
    """A server from before leases (its /admin/weights body refuses unknown keys) is one clear error and
    no renewal thread is left running for it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class OldServer(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            extra = sorted(set(body) - {"champion", "challenger"})
            code, answer = (422, {"error": {"message": f"unknown field(s): {', '.join(extra)}"}}) if extra else \
                (200, {"champion": body["champion"], "challenger": body["challenger"]})
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OldServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(Exception, match=r"does not take a weights lease .*422.*lease_s.*Upgrade and restart"):
            canary.set_weights(url, 90, 10, lease_s=30)
        assert url not in canary._renewals
        assert canary.set_weights(url, 100, 0) == {"champion": 100, "challenger": 0}  # no lease: it answers
    finally:
        server.shutdown()
