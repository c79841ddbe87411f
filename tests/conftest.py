"""Fixtures that build each real service once: the demo model, an S3 endpoint over HTTP, Prefect."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The demo model (tiny Llama trained ~30 s), built once per test session."""
    from npuflow.demo.tinymodel import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("upstream") / "tiny-llama")


@pytest.fixture
def tiny_source(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the demo model that a test may corrupt."""
    dest = tmp_path / "source" / "tiny-llama"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """Poll `url` until it answers (True), or the process exits or time runs out (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(d: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on d/mlflow.db (sqlite), one worker, on 127.0.0.1:port; its log in d/server.log.
    Started again on the same d and port it serves the same registry (a restarted server)."""
    log = open(d / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--default-artifact-root", (d / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    if not wait_until_up(f"http://127.0.0.1:{port}/health", proc, timeout_s=180):
        proc.kill()
        raise RuntimeError(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
    return proc


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3 server in its own process on 127.0.0.1 and a free port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_up(f"{url}/moto-api/", proc, timeout_s=60):
        proc.kill()
        raise RuntimeError(f"moto server did not start on {url}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The standard AWS variables pointing boto3 (and MLflow's S3 client) at the local endpoint."""
    for k, v in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return s3_endpoint


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect against a temporary API server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "npuflow")
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def npuflow_home(tmp_path, monkeypatch) -> Path:
    """A fresh embedded state (sqlite MLflow, local store) per test, in a fresh working directory."""
    home = tmp_path / "home" / ".npuflow"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPUFLOW_HOME", str(home))
    for k in ("MLFLOW_TRACKING_URI", "NPUFLOW_STORE_URI", "NPUFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    return home


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run only where torch sees a CUDA device (`cuda.unavailable()` gives the reason)."""
    from npuflow.runtime.backends import cuda

    why = cuda.unavailable()
    if why:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"no CUDA here: {why}"))
