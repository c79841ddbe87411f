"""infra/prefect.yaml (for `prefect deploy`) says what `npuflow deploy` registers: same deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from npuflow.flows.deploy import DEPLOYMENTS, HARDWARE_POOLS, NIGHTLY_CRON, POOL_BY_DEVICE, check_schedule

from npuflow.core.config import load_config, parse_config
from npuflow.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())


def test_same_deployments_entrypoints_and_flows(prefect_yaml):
    from prefect.flows import load_flow_from_entrypoint

    listed = [(d["name"], d["entrypoint"]) for d in prefect_yaml["deployments"]]
    assert listed == list(DEPLOYMENTS)
    for name, entrypoint in listed:
        assert load_flow_from_entrypoint(entrypoint).name == name  # `prefect deployment run NAME/NAME`
    assert prefect_yaml["pull"] == []  # module entrypoints: workers import the installed package


def test_schedules_and_work_pools(prefect_yaml):
    by_name = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert "schedules" not in by_name["release"]  # on demand
    (nightly,) = by_name["nightly-check"]["schedules"]
    assert nightly == {"cron": NIGHTLY_CRON, "timezone": "UTC"}
    for d in by_name.values():
        assert d["work_pool"]["name"] in HARDWARE_POOLS
        assert d["work_pool"]["name"] == POOL_BY_DEVICE[d["parameters"]["config"]["convert"]["device"]]
        assert d["work_pool"]["job_variables"]["working_dir"] == "{{ $PWD }}"


def test_default_parameters_are_the_demo_config(prefect_yaml):
    for d in prefect_yaml["deployments"]:
        assert parse_config(d["parameters"]["config"]) == load_config(REPO / "configs" / "tiny-llama-cpu.yaml")


@pytest.mark.parametrize(("cron", "tz", "message"), [
    ("0 2 * *", "UTC", "bad --cron '0 2 * *'"),
    ("0 2 * * *", "Mars/Olympus", "unknown --timezone 'Mars/Olympus'"),
])
def test_bad_schedule_is_refused_up_front(cron, tz, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        check_schedule(cron, tz)
    check_schedule(NIGHTLY_CRON, "Europe/Berlin")
