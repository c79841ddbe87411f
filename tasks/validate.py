"""Task: quality of the candidate against the unquantized reference."""

from pathlib import Path

from npuflow.tasks.common import outcome
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.artifacts import Deployable, ModelArtifact, ValidationReport
from npuflow.core.config import ValidationConfig
from npuflow.core.store import open_store
from npuflow.stages.validate import validate


@task(name="validate", cache_policy=NONE)
def validate_task(
    model: ModelArtifact, deployable: Deployable, cfg: ValidationConfig, store_uri: str, cache_dir: Path
) -> ValidationReport:
    """Perplexity, top-1 agreement and KL divergence; gates from the config."""
    r = validate(model, deployable, cfg, open_store(store_uri), cache_dir)
    failed = [k for k, g in r.gates.items() if not g.passed]
    get_run_logger().info("validate: %s; gates %s", outcome(r), f"FAILED: {', '.join(failed)}" if failed else "passed")
    return r
