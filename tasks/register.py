"""Task: the MLflow run of this pipeline run and the model version (never twice for one artifact)."""

from npuflow.tasks.common import IO_RETRY_DELAYS, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import get_run_context
from prefect.transactions import get_transaction

from npuflow.core.artifacts import (
    BenchmarkReport,
    Deployable,
    ModelArtifact,
    QuantizedArtifact,
    ValidationReport,
)
from npuflow.core.config import RunConfig
from npuflow.core.settings import Settings
from npuflow.registry import client as registry


@task(name="register", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)
def register_task(
    config: RunConfig,
    model: ModelArtifact,
    quantized: QuantizedArtifact,
    deployable: Deployable,
    validation: ValidationReport,
    benchmark: BenchmarkReport | None,
) -> registry.ModelVersion:
    """Log the run (params, metrics, reports) and register the deployable with DESIGN.md's tags."""
    settings = Settings()
    c = registry.client(settings.resolved_tracking_uri)
    txn = get_transaction()
    if txn is not None:  # what the rollback hook restores if a later step of the transaction fails
        txn.set("aliases_before", registry.aliases(c, config.name))
        txn.set("model_name", config.name)
    exp = registry.experiment_id(c, config.name, settings.mlflow_artifact_location)
    flow_run = getattr(get_run_context(), "task_run", None)
    run_id = registry.log_pipeline_run(c, exp, config, deployable, validation, benchmark,
                                       str(flow_run.flow_run_id) if flow_run else None)
    version = registry.register(c, run_id, model, quantized, deployable, validation, benchmark)
    if txn is not None:
        txn.set("version", version.version)
    get_run_logger().info("register: mlflow run %s; %s version %s (%s)", run_id, version.name, version.version,
                          "new" if version.newly_registered else "already registered: cache hit")
    return version


@register_task.on_rollback
def _restore_aliases(txn) -> None:
    """Put candidate/champion/previous back as they were before this transaction, only where they still
    hold what this transaction wrote (a rollback made meanwhile is never undone)."""
    before, name = txn.get("aliases_before", None), txn.get("model_name", None)
    if before is None or name is None:
        return
    c = registry.client(Settings().resolved_tracking_uri)
    registry.restore_aliases(c, name, before, txn.get("version", None))
