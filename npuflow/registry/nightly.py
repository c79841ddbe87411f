"""Nightly check of a champion: measure it again as it was measured at registration, and judge the drift.

The re-measurement runs the release's own stage functions (npuflow.stages.validate.validate,
npuflow.bench.stage.benchmark) against a store whose stage results live in a scratch directory: they find
no earlier result, so they measure, and they publish nothing into the real store. The drift decision
is a pure function of the recorded and the new metrics under the config's promotion tolerances.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from npuflow.core.artifacts import (
    BenchmarkReport,
    Deployable,
    GateResult,
    ModelArtifact,
    QuantizedArtifact,
    ValidationReport,
    load_manifest,
)
from npuflow.core.config import PromotionConfig, RunConfig
from npuflow.core.errors import IntegrityError, NpuflowError
from npuflow.core.names import Alias, Tag
from npuflow.core.store import Store
from npuflow.registry import client as registry
from npuflow.registry.tolerance import compare

log = logging.getLogger("npuflow.nightly")

OK, DRIFT = "ok", "drift"  # values of the version tag `nightly_check`


# ---- a store that never returns an earlier stage result ---------------------------------------------


class FreshResults:
    """Reads inputs (source, quantized weights) from `base`; keys under `prefixes` (stage results) go to
    and come from `scratch` only. A stage run against it measures again and leaves `base` untouched."""

    def __init__(self, base: Store, scratch: Store, prefixes: tuple[str, ...]):
        self.base, self.scratch, self.prefixes = base, scratch, prefixes
        self.uri = base.uri

    def _pick(self, key: str) -> Store:
        return self.scratch if key.startswith(self.prefixes) else self.base

    def url(self, key: str) -> str:
        return self._pick(key).url(key)

    def exists(self, key: str) -> bool:
        return self._pick(key).exists(key)

    def read_bytes(self, key: str) -> bytes:
        return self._pick(key).read_bytes(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._pick(key).write_bytes(key, data)

    def upload_file(self, key: str, path: Path) -> None:
        self._pick(key).upload_file(key, path)

    def download_file(self, key: str, path: Path) -> None:
        self._pick(key).download_file(key, path)

    def list_keys(self, prefix: str) -> list[str]:
        return self._pick(prefix).list_keys(prefix)

    def local_path(self, key: str) -> Path | None:
        return self._pick(key).local_path(key)


def stage_prefixes(name: str) -> tuple[str, ...]:
    """Store prefixes of the validation and benchmark results of a model line."""
    return (f"models/{name}/validation/", f"models/{name}/benchmark/")


# ---- the champion as registered ------------------------------------------------------------------


class ChampionRecord(BaseModel):
    """The champion version, its deployable, the metrics recorded at registration and the config it was
    measured with (None for a version whose run has no reports/config.json)."""

    model_config = ConfigDict(frozen=True)
    version: registry.ModelVersion
    deployable: Deployable
    metrics: dict[str, float]
    config: RunConfig | None


def champion_record(c, name: str) -> ChampionRecord:
    """The `champion` of model line `name` with what its registration run recorded."""
    champion = registry.by_alias(c, name, Alias.CHAMPION)
    if champion is None:
        raise NpuflowError(
            f"no champion for {name!r} in the registry ({registry.aliases(c, name) or 'no aliases'}): "
            "there is nothing to check; release a model first (npuflow run CONFIG)"
        )
    deployable, _ = registry.deployable_of(c, champion)  # checked against the artifact_sha256 tag
    with tempfile.TemporaryDirectory(prefix="npuflow-nightly-") as tmp:
        config = _recorded_config(c, champion.run_id, tmp)
    return ChampionRecord(version=champion, deployable=deployable, metrics=registry.run_metrics(c, champion),
                          config=config)


def _recorded_config(c, run_id: str, tmp: str) -> RunConfig | None:
    try:
        path = Path(c.download_artifacts(run_id, "reports/config.json", tmp))
        return RunConfig.model_validate_json(path.read_text())
    except Exception as err:  # an older run without it: the caller measures with the given config
        log.warning("run %s has no readable reports/config.json (%s): measuring with the given config",
                    run_id, str(err)[:200])
        return None


def check_reference(store: Store, model: ModelArtifact, deployable: Deployable) -> None:
    """The reference fetched now is the model the champion was quantized from (else ppl is not comparable)."""
    quantized = load_manifest(store, deployable.quantized_key, QuantizedArtifact)
    if quantized is None:
        raise NpuflowError(f"the champion's quantized weights {deployable.quantized_key} are gone from the "
                           "store; re-run the release or point NPUFLOW_STORE_URI at the store that holds them")
    if quantized.source_manifest_sha256 != model.manifest_sha256:
        raise IntegrityError(
            f"the reference fetched from {model.source_uri} ({model.manifest_sha256[:12]}…) is not the model the "
            f"champion was quantized from ({quantized.source_manifest_sha256[:12]}…): its files changed upstream"
        )


# ---- the drift decision (pure) -------------------------------------------------------------------


class DriftVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)
    passed: bool
    failures: list[str]  # what drifted past tolerance (empty when passed)
    notes: list[str]  # what was within tolerance or not compared
    checks: dict[str, GateResult]  # metric -> new value against its limit


def check_drift(recorded: dict[str, float], measured: dict[str, float], gates: dict[str, GateResult],
                tol: PromotionConfig, tpot_regression_pct: float) -> DriftVerdict:
    """The champion measured again against its registration: each validation gate must still pass, and
    it may not be worse than recorded beyond the tolerances a candidate is held to against a champion
    (npuflow.registry.tolerance: ppl, top-1 under `tol`; TPOT p50 under the report's regression gate). Better is
    never drift."""
    failures = [f"gate {k}: {g.value:.4g}, must be {g.op} {g.threshold:.4g}" for k, g in gates.items()
                if not g.passed]
    c = compare(measured, recorded, tol, tpot_regression_pct, baseline="recorded")
    return DriftVerdict(passed=not failures and c.passed, failures=failures + c.failures, notes=c.notes,
                        checks=c.checks)


# ---- recording the check ---------------------------------------------------------------------------


def log_check(c, record: ChampionRecord, validation: ValidationReport, benchmark: BenchmarkReport,
              verdict: DriftVerdict, tpot_regression_pct: float, flow_run_id: str | None = None) -> str:
    """An MLflow run of the check (new metrics under DESIGN.md names, verdict, report against the recorded
    metrics) in the model line's experiment, then tags on the version; returns the run id."""
    from mlflow.entities import Metric

    from npuflow.bench.report import render, scenario_metrics

    v = record.version
    status = OK if verdict.passed else DRIFT
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    exp = c.get_run(v.run_id).info.experiment_id
    tags = {"npuflow.kind": "nightly-check", "npuflow.git_sha": registry.git_sha(), "model_name": v.name,
            "model_version": v.version, "champion_run_id": v.run_id or "", Tag.NIGHTLY_CHECK: status,
            "device": benchmark.device, "device_name": benchmark.device_name}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run = c.create_run(exp, tags=tags, run_name=f"{v.name}-v{v.version}-nightly-{when[:10]}")
    rid = run.info.run_id
    metrics = {**validation.metrics, **benchmark.metrics, **scenario_metrics(benchmark)}
    c.log_batch(rid, metrics=[Metric(k, float(x), 0, 0) for k, x in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "nightly.json").write_text(json.dumps({
            "model": v.name, "version": v.version, "checked_at": when, "status": status,
            "verdict": verdict.model_dump(mode="json"), "recorded": record.metrics, "measured": metrics,
        }, indent=2))
        (d / "validation.json").write_text(validation.model_dump_json(indent=2))
        (d / "benchmark.json").write_text(benchmark.model_dump_json(indent=2))
        render(benchmark, d, champion=record.metrics, champion_label=f"v{v.version} at registration",
               tpot_regression_pct=tpot_regression_pct)
        c.log_artifacts(rid, str(d), "reports")
    c.set_terminated(rid, status="FINISHED" if verdict.passed else "FAILED")
    reason = " | ".join(verdict.failures or verdict.notes)[:4900]
    registry.tag_version(c, v, {Tag.NIGHTLY_CHECK: status, Tag.NIGHTLY_CHECK_DATE: when,
                                "nightly_check_run_id": rid, "nightly_check_reason": reason or "within tolerance"})
    return rid
