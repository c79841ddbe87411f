"""`rollout` flow on a registry made by two real releases: a slow candidate is rolled back; the typed approval
form resumes the paused flow (or its timeout rejects); a good candidate becomes champion."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from npuflow.flows.rollout import RolloutFailedError, rollout

from npuflow.core.names import Alias
from npuflow.registry import client as registry
from tests.integration.test_serve import (  # noqa: F401  (home, released: the fixtures the tests use)
    NAME,
    client,
    home,
    make_config,
    options,
    released,
    serving,
)

pytestmark = pytest.mark.integration
QUICK = {"min_duration_s": 1, "min_requests": 6, "max_duration_s": 20, "max_requests": 60}
NO_RELATIVE = {"ttft_regression_pct": None, "tpot_regression_pct": None, "error_rate_max": 0.0}


def config(stages, **rollout_kw):
    return make_config("file:///unused", rollout={"stages": stages, "max_tokens": 4, "concurrency": 2,
                                                   **rollout_kw})


@pytest.mark.usefixtures("home")
def test_slow_candidate_fails_canary_traffic_returns_to_champion_and_version_says_why():
    client().set_registered_model_alias(NAME, Alias.CANDIDATE, "1")  # challenger v1 beside champion v2
    cfg = config([{"name": "canary", "weight": 50, **QUICK,
                   "slo": {"tpot_regression_pct": 50, "ttft_regression_pct": None}}])
    with serving(options(challenger_slowdown_ms=30)) as (url, _pool):
        with pytest.raises(RolloutFailedError, match=r"rolled_back.*tpot p95"):
            rollout(cfg, server_url=url)
        health = httpx.get(f"{url}/health").json()
    assert health["weights"]["challenger"] == 0 and health["weights"]["champion"] == 100
    c = client()
    assert registry.aliases(c, NAME)[Alias.CHAMPION] == "2"
    tags = c.get_model_version(NAME, "1").tags
    assert tags["rollout"] == "rolled_back" and "tpot p95" in tags["rollout_reason"]


def _resume_when_paused(answer: dict, found: list, quit_: threading.Event) -> threading.Thread:
    """In another thread: wait for the paused rollout and resume it with the typed form's answer."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    def go():
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as c:
            while time.monotonic() < deadline and not quit_.is_set():
                paused = [r for r in c.read_flow_runs(limit=50) if r.state and r.state.is_paused()]
                if paused:
                    found.append(paused[0].id)
                    resume_flow_run(paused[0].id, run_input=answer)
                    return
                time.sleep(0.5)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.usefixtures("home")
def test_approval_form_resumes_the_flow_records_the_reviewer_and_the_candidate_becomes_champion():
    client().set_registered_model_alias(NAME, Alias.CANDIDATE, "1")
    cfg = config([{"name": "canary", "weight": 50, **QUICK, "slo": NO_RELATIVE},
                  {"name": "full", "weight": 100, **QUICK, "slo": NO_RELATIVE}],
                 approval=True, approval_timeout_s=120, approval_poll_s=1)
    found: list = []
    quit_ = threading.Event()
    t = _resume_when_paused({"approve": True, "reviewer": "ada", "comment": "latency fine"}, found, quit_)
    try:
        record = rollout(cfg)  # embedded serving process
    finally:
        quit_.set()  # never resume another test's flow run
        t.join(timeout=5)
    assert found, "the flow never paused for approval"
    assert record.decision == "promoted" and record.approved_by == "ada"
    assert [s.verdict.result for s in record.stages] == ["pass", "pass"]
    c = client()
    assert registry.aliases(c, NAME)[Alias.CHAMPION] == "1"
    assert registry.aliases(c, NAME)[Alias.PREVIOUS] == "2"
    tags = c.get_model_version(NAME, "1").tags
    assert (tags["rollout"], tags["approved_by"], tags["approval_comment"]) == ("promoted", "ada", "latency fine")


@pytest.mark.usefixtures("home")
def test_no_approval_before_the_timeout_rejects_and_keeps_the_champion():
    client().set_registered_model_alias(NAME, Alias.CANDIDATE, "1")
    cfg = config([{"name": "full", "weight": 100, **QUICK, "slo": NO_RELATIVE}],
                 approval=True, approval_timeout_s=3, approval_poll_s=1)
    with pytest.raises(RolloutFailedError, match="rejected: no approval within 3 s"):
        rollout(cfg)
    c = client()
    assert registry.aliases(c, NAME)[Alias.CHAMPION] == "2"
    tags = c.get_model_version(NAME, "1").tags
    assert (tags["rollout"], tags["approved"]) == ("rejected", "false")
