"""The nightly-check flow: measure the champion again and fail the run (the alert) when it drifted."""

from __future__ import annotations

from npuflow.tasks.fetch import fetch_task
from npuflow.tasks.nightly import champion_task, rebenchmark_task, record_check_task, revalidate_task
from prefect import flow, get_run_logger
from pydantic import BaseModel

from npuflow.core.config import RunConfig
from npuflow.core.errors import DriftError
from npuflow.core.settings import Settings
from npuflow.registry.nightly import DRIFT, OK, check_drift


class NightlyResult(BaseModel):
    name: str
    version: str
    status: str  # ok | drift (a drift fails the run: this is returned only for ok)
    reasons: list[str]
    measured: dict[str, float]  # DESIGN.md names, this run
    recorded: dict[str, float]  # the same names, as recorded at registration
    run_id: str  # the MLflow run of this check


@flow(name="nightly-check", log_prints=True)
def nightly_check(config: RunConfig) -> NightlyResult:
    """Validate and benchmark the model line's `champion` again, as it was measured at registration, and
    compare with the recorded metrics under the config's gates and promotion tolerances. Drift past them
    fails this flow run; the version is tagged nightly_check=ok|drift either way."""
    settings = Settings()
    store, cache = settings.resolved_store_uri, settings.cache_dir
    log = get_run_logger()

    # ---- the champion, and the settings its recorded metrics were measured with ----
    champion = champion_task(config.name)
    measured_as = champion.config or config  # same text, windows and scenarios as the recorded numbers
    log.info("nightly-check %s v%s on %s: store %s, tracking %s", config.name, champion.version.version,
             champion.deployable.device, store, settings.resolved_tracking_uri)

    # ---- measure again: the stages' own code, no earlier result reused ----
    model = fetch_task(measured_as.source, config.name, store)
    gates_now = measured_as.validation.model_copy(update={"gates": config.validation.gates})
    validation = revalidate_task(model, champion.deployable, gates_now, store, cache)
    bench = rebenchmark_task(champion.deployable, measured_as.benchmark, store, cache)

    # ---- compare with the registration, record, alert ----
    measured = {**validation.metrics, **bench.metrics}
    verdict = check_drift(champion.metrics, measured, validation.gates, config.promotion,
                          config.benchmark.tpot_regression_pct)
    run_id = record_check_task(champion, validation, bench, verdict, measured_as.benchmark.tpot_regression_pct)
    if not verdict.passed:
        raise DriftError(
            f"nightly-check: {config.name} champion v{champion.version.version} drifted past tolerance: "
            + "; ".join(verdict.failures) + f" (tagged nightly_check={DRIFT}; MLflow run {run_id})"
        )
    log.info("nightly-check: %s v%s within tolerance: %s", config.name, champion.version.version,
             "; ".join(verdict.notes))
    keys = [k for k in ("ppl_candidate", "top1_agreement", "kl_divergence", "tpot_ms_p50", "ttft_ms_p50")
            if k in measured]
    return NightlyResult(
        name=config.name, version=champion.version.version, status=OK, reasons=verdict.notes,
        measured={k: measured[k] for k in keys},
        recorded={k: champion.metrics[k] for k in keys if k in champion.metrics}, run_id=run_id,
    )
