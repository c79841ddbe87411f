"""The release flow: fetch -> quantize -> convert -> validate -> benchmark -> register -> promote."""

from __future__ import annotations

from npuflow.flows.rollout import rollout
from npuflow.tasks.benchmark import benchmark_task
from npuflow.tasks.convert import convert_task
from npuflow.tasks.fetch import fetch_task
from npuflow.tasks.promote import promote_task
from npuflow.tasks.quantize import quantize_task
from npuflow.tasks.register import register_task
from npuflow.tasks.validate import validate_task
from prefect import flow, get_run_logger
from prefect.transactions import transaction
from pydantic import BaseModel

from npuflow.core.config import RunConfig
from npuflow.core.errors import GateFailedError
from npuflow.core.locks import model_line_lock
from npuflow.core.settings import Settings
from npuflow.core.store import open_store, sweep_leftovers


class ReleaseResult(BaseModel):
    name: str
    version: str
    registered_new_version: bool
    decision: str  # promote (directly or after the staged rollout) | keep_champion | already_champion
    reasons: list[str]
    gates_passed: bool
    cache_hits: dict[str, bool]  # stage -> found already published
    metrics: dict[str, float]
    store_uri: str
    tracking_uri: str


@flow(name="release", log_prints=True)
def release(config: RunConfig) -> ReleaseResult:
    """Release one model line: every stage's output is content-addressed and cached in the store."""
    settings = Settings()
    store, cache = settings.resolved_store_uri, settings.cache_dir
    log = get_run_logger()
    log.info("release %s from %s -> store %s, tracking %s", config.name, config.source.uri, store,
             settings.resolved_tracking_uri)

    swept = sweep_leftovers(open_store(store))  # temporary files and unfinished uploads of runs that died
    if swept:
        log.info("removed %d leftovers of crashed runs from the store: %s", len(swept), ", ".join(swept[:5]))

    # ---- build and measure ----
    model = fetch_task(config.source, config.name, store)
    quantized = quantize_task(model, config.quantization, store, cache, config.validation)
    deployable = convert_task(quantized, config.convert, store, cache, config.serving)
    validation = validate_task(model, deployable, config.validation, store, cache)
    bench = benchmark_task(deployable, config.benchmark, store, cache) if validation.passed else None

    # ---- registry: one writer per model line (a lock in the store); aliases put back if this fails part-way ----
    with model_line_lock(open_store(store), config.name, f"release of {config.name} (register, promote)"), \
            transaction():
        version = register_task(config, model, quantized, deployable, validation, bench)
        decision = promote_task(version, config.promotion, config.benchmark.tpot_regression_pct)

    # ---- promotion strategy rollout: the candidate takes traffic in stages before it becomes champion ----
    if decision.action == "rollout":
        log.info("staged rollout of v%s: %s", version.version,
                 ", ".join(f"{s.name} {s.weight:g}%" for s in config.rollout.stages))
        staged = rollout(config, version=version.version)  # raises RolloutFailedError (the run fails) when a stage fails or is rejected
        decision = decision.model_copy(update={"action": "promote", "reasons": [
            f"staged rollout passed ({', '.join(f'{r.name} {r.weight:g}%' for r in staged.stages)}), "
            f"approved by {staged.approved_by}", *decision.reasons]})

    hits = {"fetch": model.cache_hit, "quantize": quantized.cache_hit, "convert": deployable.cache_hit,
            "validate": validation.cache_hit}
    if bench is not None:
        hits["benchmark"] = bench.cache_hit
    hits["register"] = not version.newly_registered
    log.info("cache hits: %s", ", ".join(k for k, v in hits.items() if v) or "none")
    if not validation.passed:
        failed = {k: g for k, g in validation.gates.items() if not g.passed}
        raise GateFailedError(
            f"release stopped: {config.name} version {version.version} failed its gates ("
            + "; ".join(f"{k} = {g.value:.4g}, must be {g.op} {g.threshold:g}" for k, g in failed.items())
            + "); it is tagged gates=failed and was not promoted"
        )
    return ReleaseResult(
        name=config.name, version=version.version, registered_new_version=version.newly_registered,
        decision=decision.action, reasons=decision.reasons, gates_passed=validation.passed, cache_hits=hits,
        metrics={**validation.metrics, **(bench.metrics if bench else {})}, store_uri=store,
        tracking_uri=settings.resolved_tracking_uri,
    )
