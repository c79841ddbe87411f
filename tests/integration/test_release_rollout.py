"""promotion.strategy rollout: the release flow leaves a passing candidate as `candidate` and runs the staged
rollout (embedded server, bounded load generator) before `champion` moves."""

from __future__ import annotations

import pytest
from npuflow.flows.release import release

from npuflow.registry import client as registry
from tests.integration.test_rollout_flow import NO_RELATIVE, QUICK
from tests.integration.test_serve import LENIENT_PROMOTION, NAME, client, make_config

pytestmark = pytest.mark.integration


def test_release_with_rollout_strategy_stages_the_candidate_then_promotes(prefect_harness, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPUFLOW_HOME", str(tmp_path / ".npuflow"))
    for k in ("MLFLOW_TRACKING_URI", "NPUFLOW_STORE_URI", "NPUFLOW_TRACKING_URI", "NPUFLOW_SERVE_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    src = tiny_model_dir.as_uri()
    staged = {"promotion": {**LENIENT_PROMOTION, "strategy": "rollout"},
              "rollout": {"stages": [{"name": "canary", "weight": 50, **QUICK, "slo": NO_RELATIVE},
                                     {"name": "full", "weight": 100, **QUICK, "slo": NO_RELATIVE}],
                          "max_tokens": 4, "concurrency": 2}}

    first = release(make_config(src, quantization={"ignore": []}, **staged))
    assert (first.version, first.decision) == ("1", "promote")  # no champion yet: nothing to canary against
    assert "no champion yet" in first.reasons[0]

    second = release(make_config(src, **staged))
    assert (second.version, second.decision) == ("2", "promote"), second.reasons
    assert second.reasons[0].startswith("staged rollout passed (canary 50%, full 100%)")
    c = client()
    assert registry.aliases(c, NAME) == {"champion": "2", "previous": "1", "candidate": "2"}
    tags = c.get_model_version(NAME, "2").tags
    assert tags["rollout"] == "promoted"
