"""`npuflow deploy` and `prefect deploy --prefect-file infra/prefect.yaml` against a real Prefect server
started here (its own home and sqlite database), read back through the Prefect client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until_up

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    """This environment without any Prefect server or npuflow state of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NPUFLOW_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 and a free port; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=log, start_new_session=True,  # its own process group: stopped as a whole
        env=_env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
                 PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false"),
    )
    url = f"http://127.0.0.1:{port}/api"
    if not wait_until_up(f"{url}/health", proc, timeout_s=120):
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        raise RuntimeError(f"prefect server did not start on {url}:\n" + (home / "server.log").read_text()[-3000:])
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    log.close()


def npuflow_deploy(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npuflow.cli", "deploy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env or _env())


def read_back(url: str) -> dict:
    """name -> deployment, and pool name -> work pool, as the server holds them."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deployments = {n: client.read_deployment_by_name(f"{n}/{n}") for n in ("release", "nightly-check")}
        pools = {p.name: p for p in client.read_work_pools()}
    return {"deployments": deployments, "pools": pools}


def assert_runconfig_form(schema: dict) -> None:
    """The parameter schema is the flow's: one `config` parameter rendered from RunConfig."""
    assert schema["required"] == ["config"]
    assert schema["properties"]["config"]["$ref"] == "#/definitions/RunConfig"
    defs = schema["definitions"]
    assert {"name", "source", "quantization", "convert", "validation", "benchmark", "promotion"} <= set(
        defs["RunConfig"]["properties"])
    assert defs["QuantizationConfig"]["properties"]["scheme"]["enum"] == ["w8a16", "w4a16", "w8a8", "w8a8-dynamic"]  # the typed form
    assert defs["ConvertConfig"]["properties"]["device"]["enum"] == ["cpu", "cuda", "npu"]


def test_npuflow_deploy_registers_both_deployments_with_schedule_pools_and_form(prefect_server, tmp_path):
    config = REPO / "configs" / "tiny-llama-cpu.yaml"
    args = (str(config), "--api-url", prefect_server, "--cron", "30 3 * * 1-5",
            "--timezone", "Europe/Berlin", "--json")
    proc = npuflow_deploy(*args, cwd=tmp_path, env=_env(MLFLOW_TRACKING_URI="http://mlflow.example:5000"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {d["name"] for d in out["deployments"]} == {"release/release", "nightly-check/nightly-check"}

    server = read_back(prefect_server)
    release, nightly = server["deployments"]["release"], server["deployments"]["nightly-check"]
    assert {p: server["pools"][p].type for p in ("cpu", "npu")} == {"cpu": "process", "npu": "process"}
    assert release.work_pool_name == nightly.work_pool_name == "cpu"  # the config's convert.device
    assert release.schedules == []  # on demand
    (sched,) = nightly.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("30 3 * * 1-5", "Europe/Berlin", True)
    assert (release.entrypoint, nightly.entrypoint) == ("npuflow.flows.release.release", "npuflow.flows.nightly.nightly_check")
    for d in (release, nightly):
        assert_runconfig_form(d.parameter_openapi_schema)
        assert d.enforce_parameter_schema
        assert d.parameters["config"]["name"] == "tiny-llama"
        assert d.parameters["config"]["benchmark"]["scenarios"][1]["batch_size"] == 4  # the whole file
        assert d.job_variables["working_dir"] == str(tmp_path.resolve())
        assert d.job_variables["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}
    ids = {d["name"]: d["id"] for d in out["deployments"]}
    assert ids == {"release/release": str(release.id), "nightly-check/nightly-check": str(nightly.id)}

    # deploying again updates in place: same ids, the new schedule replaces the old one
    again = npuflow_deploy(str(config), "--api-url", prefect_server, "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {d["name"]: d["id"] for d in json.loads(again.stdout)["deployments"]} == ids
    (sched,) = read_back(prefect_server)["deployments"]["nightly-check"].schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "UTC")


def test_prefect_deploy_with_infra_prefect_yaml_registers_the_same(prefect_server, tmp_path):
    from npuflow.flows.deploy import HARDWARE_POOLS, ensure_pools
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        ensure_pools(client, list(HARDWARE_POOLS))  # `prefect deploy` needs them to exist
    proc = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "infra" / "prefect.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=_env(PREFECT_API_URL=prefect_server, PWD=str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    server = read_back(prefect_server)
    release, nightly = server["deployments"]["release"], server["deployments"]["nightly-check"]
    assert (release.entrypoint, nightly.entrypoint) == ("npuflow.flows.release.release", "npuflow.flows.nightly.nightly_check")
    assert release.work_pool_name == nightly.work_pool_name == "cpu"
    (sched,) = nightly.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("0 2 * * *", "UTC")
    for d in (release, nightly):
        assert_runconfig_form(d.parameter_openapi_schema)
        assert d.job_variables["working_dir"] == str(tmp_path)
        assert d.parameters["config"]["name"] == "tiny-llama"


def test_no_server_is_a_clear_error_and_exit_2(tmp_path):
    config = str(REPO / "configs" / "tiny-llama-cpu.yaml")
    dead = f"http://127.0.0.1:{free_port()}/api"
    proc = npuflow_deploy(config, "--api-url", dead, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"no Prefect server answers at {dead}" in proc.stderr
    proc = npuflow_deploy(config, cwd=tmp_path)  # no --api-url, no PREFECT_API_URL
    assert proc.returncode == 2 and "no Prefect server: pass --api-url" in proc.stderr
    proc = npuflow_deploy(config, "--api-url", dead, "--cron", "every night", cwd=tmp_path)
    assert proc.returncode == 2 and "bad --cron 'every night'" in proc.stderr
