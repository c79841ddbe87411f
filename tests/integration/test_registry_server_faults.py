"""The registry under faults, against a real `mlflow server`: reads fail closed, nothing is promoted.

Faults are injected on the wire: a small HTTP proxy in front of the server answers 503 for chosen API
paths (a flaky MLflow), or the tracking URI points at a closed port (MLflow down). No registry code is
mocked.
"""

from __future__ import annotations

import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import free_port, start_mlflow_server

pytestmark = pytest.mark.integration

# what the proxy fails: "METHOD /api/path" substrings
ALIAS_PATH = "GET /api/2.0/mlflow/registered-models/alias"  # get_model_version_by_alias (not the POST that sets it)
SEARCH_PATH = "/model-versions/search"  # search_model_versions
GET_MODEL_PATH = "GET /api/2.0/mlflow/registered-models/get"  # get_registered_model: aliases()


class _Proxy(BaseHTTPRequestHandler):
    """Forwards to the MLflow server; answers 503 when "METHOD PATH" contains one of server.fail."""

    def _handle(self) -> None:
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        if any(f in f"{self.command} {self.path}" for f in srv.fail):  # type: ignore[attr-defined]
            srv.hits += 1  # type: ignore[attr-defined]
            self._send(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected 503"}')
            return
        req = urllib.request.Request(srv.upstream + self.path, data=body, method=self.command,  # type: ignore[attr-defined]
                                     headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                self._send(r.status, r.read())
        except urllib.error.HTTPError as err:
            self._send(err.code, err.read())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on sqlite, one worker, on 127.0.0.1 and a free port."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def proxy(mlflow_server):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    srv.upstream, srv.fail, srv.hits = mlflow_server, set(), 0  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(10)


@pytest.fixture
def fast_fail(monkeypatch):
    """MLflow's HTTP client: no retries and a short timeout, so a fault answers in seconds."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _line(c, name: str, metrics: dict[str, float]):
    """A model line with champion v1 and a candidate v2 (gates passed), both with runs and metrics."""
    from npuflow.core.names import Alias
    from npuflow.registry import client as registry

    exp = registry.experiment_id(c, name, None)
    c.create_registered_model(name)
    out = []
    for i in (1, 2):
        run = c.create_run(exp)
        for k, v in metrics.items():
            c.log_metric(run.info.run_id, k, v)
        v = c.create_model_version(name, source=f"runs:/{run.info.run_id}/deployable", run_id=run.info.run_id,
                                   tags={"gates": "passed", "artifact_sha256": f"{i}" * 64, "rollout": "registered"})
        out.append(v)
    c.set_registered_model_alias(name, Alias.CHAMPION, out[0].version)
    c.set_registered_model_alias(name, Alias.CANDIDATE, out[1].version)
    return registry.by_alias(c, name, Alias.CANDIDATE)


METRICS = {"ppl_candidate": 2.0, "ppl_reference": 2.0, "ppl_delta_pct": 0.0, "top1_agreement": 1.0,
           "kl_divergence": 0.0, "tpot_ms_p50": 1.0, "ttft_ms_p50": 1.0}


def test_a_503_on_the_champion_read_promotes_nothing(proxy, fast_fail) -> None:
    """Issue 13 hole 1: before the fix the 503 read as "no champion yet" and v2 took over at once."""
    from npuflow.core.config import PromotionConfig
    from npuflow.core.errors import RegistryError
    from npuflow.registry import client as registry
    from npuflow.registry.promotion import promote

    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    c = registry.client(url)
    cand = _line(c, "faults-503", METRICS)
    before = registry.aliases(c, "faults-503")
    proxy.fail = {ALIAS_PATH}
    with pytest.raises(RegistryError, match=rf"MLflow at {url} failed reading alias faults-503@champion") as ei:
        promote(c, cand, PromotionConfig(strategy="direct"), 5.0, approved_by="test")
    assert "check that the MLflow server is up" in str(ei.value)
    assert proxy.hits >= 1
    proxy.fail = set()
    assert registry.aliases(c, "faults-503") == before  # champion still v1
    v2 = c.get_model_version("faults-503", cand.version)
    assert v2.tags.get("rollout") == "registered"  # no decision recorded either


READS = {  # the API path each read calls, and the read
    ALIAS_PATH: lambda registry, c, n: registry.by_alias(c, n, "champion"),
    SEARCH_PATH: lambda registry, c, n: registry.find_by_artifact(c, n, "1" * 64),
    GET_MODEL_PATH: lambda registry, c, n: registry.aliases(c, n),
}


@pytest.mark.parametrize("path", list(READS))
def test_every_registry_read_fails_closed_on_a_5xx(proxy, fast_fail, path: str) -> None:
    from npuflow.core.errors import RegistryError
    from npuflow.registry import client as registry

    c = registry.client(f"http://127.0.0.1:{proxy.server_address[1]}")
    name = f"faults-reads-{path.rsplit('/', 1)[-1]}"
    _line(c, name, METRICS)
    proxy.fail = {path}
    with pytest.raises(RegistryError, match="MLflow at"):
        READS[path](registry, c, name)
    assert proxy.hits >= 1


def test_not_found_is_still_absent_through_the_server(proxy, fast_fail) -> None:
    from npuflow.registry import client as registry

    c = registry.client(f"http://127.0.0.1:{proxy.server_address[1]}")
    assert registry.by_alias(c, "no-such-model", "champion") is None
    assert registry.aliases(c, "no-such-model") == {}
    assert registry.find_by_artifact(c, "no-such-model", "0" * 64) is None
    c.create_registered_model("no-champion-yet")
    assert registry.by_alias(c, "no-champion-yet", "champion") is None  # INVALID_PARAMETER_VALUE: alias not found


def test_mlflow_down_fails_closed_with_the_uri(fast_fail) -> None:
    from npuflow.core.errors import RegistryError
    from npuflow.registry import client as registry

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    c = registry.client(url)
    for read in (lambda: registry.by_alias(c, "m", "champion"), lambda: registry.aliases(c, "m"),
                 lambda: registry.find_by_artifact(c, "m", "0" * 64)):
        with pytest.raises(RegistryError, match=rf"MLflow at {url} failed"):
            read()


def test_mlflow_server_fixture_is_real(mlflow_server) -> None:
    with urllib.request.urlopen(f"{mlflow_server}/health", timeout=10) as r:
        assert r.status == 200
    assert Path(sys.executable).exists()
