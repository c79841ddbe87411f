"""Tasks of the nightly check: the champion as registered, measured again without the stage cache, recorded."""

import tempfile
from pathlib import Path

from npuflow.tasks.common import IO_RETRY_DELAYS, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import get_run_context

from npuflow.bench.stage import benchmark
from npuflow.core.artifacts import BenchmarkReport, Deployable, ModelArtifact, ValidationReport
from npuflow.core.config import BenchmarkConfig, ValidationConfig
from npuflow.core.settings import Settings
from npuflow.core.store import LocalStore, open_store
from npuflow.registry import client as registry
from npuflow.registry import nightly
from npuflow.stages.validate import validate


@task(name="champion", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)
def champion_task(name: str) -> nightly.ChampionRecord:
    """The `champion` version, its deployable and the metrics and config recorded at registration."""
    record = nightly.champion_record(registry.client(Settings().resolved_tracking_uri), name)
    get_run_logger().info("champion: %s v%s (%s on %s), run %s", name, record.version.version,
                          record.deployable.runtime, record.deployable.device, record.version.run_id)
    return record


@task(name="revalidate", cache_policy=NONE)
def revalidate_task(model: ModelArtifact, deployable: Deployable, cfg: ValidationConfig, store_uri: str,
                    cache_dir: Path) -> ValidationReport:
    """The validate stage again, on the champion, with no earlier result to find."""
    base = open_store(store_uri)
    nightly.check_reference(base, model, deployable)
    with tempfile.TemporaryDirectory(prefix="npuflow-nightly-") as tmp:
        store = nightly.FreshResults(base, LocalStore(Path(tmp)), nightly.stage_prefixes(deployable.name))
        r = validate(model, deployable, cfg, store, cache_dir)
    get_run_logger().info("revalidate: ppl %.4f (reference %.4f), top-1 %.4f, KL %.5f", r.metrics["ppl_candidate"],
                          r.metrics["ppl_reference"], r.metrics["top1_agreement"], r.metrics["kl_divergence"])
    return r


@task(name="rebenchmark", cache_policy=NONE)
def rebenchmark_task(deployable: Deployable, cfg: BenchmarkConfig, store_uri: str, cache_dir: Path) -> BenchmarkReport:
    """The benchmark stage again (fresh process, same scenarios), with no earlier result to find."""
    base = open_store(store_uri)
    with tempfile.TemporaryDirectory(prefix="npuflow-nightly-") as tmp:
        store = nightly.FreshResults(base, LocalStore(Path(tmp)), nightly.stage_prefixes(deployable.name))
        b = benchmark(deployable, cfg, store, cache_dir)
    get_run_logger().info("rebenchmark: TPOT p50 %.3f ms, TTFT p50 %.3f ms", b.metrics["tpot_ms_p50"],
                          b.metrics["ttft_ms_p50"])
    return b


@task(name="record-check", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)
def record_check_task(record: nightly.ChampionRecord, validation: ValidationReport, bench: BenchmarkReport,
                      verdict: nightly.DriftVerdict, tpot_regression_pct: float) -> str:
    """An MLflow run of this check and the version's tags nightly_check=ok|drift, date, run id."""
    c = registry.client(Settings().resolved_tracking_uri)
    task_run = getattr(get_run_context(), "task_run", None)
    rid = nightly.log_check(c, record, validation, bench, verdict, tpot_regression_pct,
                            str(task_run.flow_run_id) if task_run else None)
    get_run_logger().info("record-check: mlflow run %s; %s v%s tagged nightly_check=%s", rid, record.version.name,
                          record.version.version, nightly.OK if verdict.passed else nightly.DRIFT)
    return rid
