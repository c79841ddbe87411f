"""Task: quality of the candidate against the unquantized reference."""

from pathlib import Path

from npuflow.tasks.common import IO_RETRY_DELAYS, outcome, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.artifacts import Deployable, ModelArtifact, ValidationReport
from npuflow.core.config import ValidationConfig
from npuflow.core.store import open_store
from npuflow.stages.validate import validate


@task(name="validate", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)  # store I/O that a retry can fix (the stages are content-addressed: a retry republishes nothing)
def validate_task(
    model: ModelArtifact, deployable: Deployable, cfg: ValidationConfig, store_uri: str, cache_dir: Path
) -> ValidationReport:
    """Perplexity, top-1 agreement and KL divergence; gates from the config."""
    r = validate(model, deployable, cfg, open_store(store_uri), cache_dir)
    failed = [k for k, g in r.gates.items() if not g.passed]
    get_run_logger().info("validate: %s; gates %s", outcome(r), f"FAILED: {', '.join(failed)}" if failed else "passed")
    return r
