"""The nightly-check flow through real Prefect and MLflow (sqlite): the champion measured again, compared
with its registration, recorded; drift fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npuflow.core.config import parse_config
from npuflow.core.errors import DriftError, NpuflowError
from npuflow.core.names import Alias
from npuflow.core.settings import Settings
from npuflow.registry import client as registry

pytestmark = pytest.mark.integration


def make_config(source: str, **sections):
    """A demo-like config with a short evaluation and benchmark. TPOT tolerance is wide: on a shared 2-core
    machine timing noise would be drift; quality numbers are deterministic and held to the demo's tolerances."""
    data = {
        "name": "tiny-llama",
        "source": {"uri": source},
        "validation": {"max_tokens": 2048, "seq_len": 128},
        "benchmark": {"input_len": 32, "output_len": 8, "warmup": 1, "iterations": 3, "tpot_regression_pct": 1000.0},
        "promotion": {"ppl_regression_pct": 1.0, "top1_drop_max": 0.01},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return parse_config(data)


def results_in_store(home, stage: str) -> int:
    return len(list((home / "artifacts" / "models" / "tiny-llama" / stage).glob("*/manifest.json")))


def test_nightly_check_passes_on_the_champion_then_fails_when_it_drifted(prefect_harness, npuflow_home, tiny_source,
                                                                         tmp_path):
    from npuflow.flows.nightly import nightly_check
    from npuflow.flows.release import release

    cfg = make_config(tiny_source.as_uri())
    released = release(cfg)
    c = registry.client(Settings().resolved_tracking_uri)
    champion = registry.by_alias(c, "tiny-llama", Alias.CHAMPION)
    recorded = registry.run_metrics(c, champion)
    stored = {s: results_in_store(npuflow_home, s) for s in ("validation", "benchmark")}
    description = c.get_model_version("tiny-llama", released.version).description  # what a reviewer reads
    assert "**Validation gates passed**" in description and "| kl_divergence |" in description
    assert "no champion" in description and "| TPOT p50 (ms) |" in description
    assert f"runs:/{champion.run_id}/reports/report.html" in description

    ok = nightly_check(cfg)
    assert (ok.status, ok.version) == ("ok", released.version)
    assert ok.measured["ppl_candidate"] == pytest.approx(recorded["ppl_candidate"], rel=1e-9)
    assert ok.measured["tpot_ms_p50"] != recorded["tpot_ms_p50"]  # timed again, not read back
    assert {s: results_in_store(npuflow_home, s) for s in stored} == stored  # nothing published
    tags = c.get_model_version("tiny-llama", released.version).tags
    assert tags["nightly_check"] == "ok" and tags["nightly_check_run_id"] == ok.run_id
    assert tags["nightly_check_date"].endswith("Z")
    run = c.get_run(ok.run_id)
    assert run.data.tags["npuflow.kind"] == "nightly-check" and run.info.status == "FINISHED"
    assert {"ppl_candidate", "top1_agreement", "tpot_ms_p50", "ttft_ms_p50"} <= set(run.data.metrics)
    report = json.loads(Path(c.download_artifacts(ok.run_id, "reports/nightly.json", str(tmp_path))).read_text())
    assert report["status"] == "ok" and report["recorded"]["ppl_candidate"] == recorded["ppl_candidate"]

    # the registration recorded a 3% better perplexity than the champion really has: drift past 1%
    c.log_metric(champion.run_id, "ppl_candidate", recorded["ppl_candidate"] * 0.97, step=1)
    with pytest.raises(DriftError, match=r"ppl_candidate: \S+ vs recorded \S+ \(\+3\.\d\d%, allowed \+1%\)"):
        nightly_check(cfg)
    version = c.get_model_version("tiny-llama", released.version)
    assert version.tags["nightly_check"] == "drift" and "ppl_candidate" in version.tags["nightly_check_reason"]
    assert c.get_run(version.tags["nightly_check_run_id"]).info.status == "FAILED"
    assert registry.by_alias(c, "tiny-llama", Alias.CHAMPION).version == released.version  # an alert only


def test_nightly_check_without_a_champion_says_so(prefect_harness, npuflow_home):
    from npuflow.flows.nightly import nightly_check

    with pytest.raises(NpuflowError, match=r"no champion for 'tiny-llama'.*release a model first"):
        nightly_check(make_config("file:///nowhere/tiny-llama"))
