"""Task: fetch the source's weights into the artifact store."""

from npuflow.tasks.common import IO_RETRY_DELAYS, outcome, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.artifacts import ModelArtifact
from npuflow.core.config import SourceConfig
from npuflow.core.store import open_store
from npuflow.stages.fetch import fetch


@task(name="fetch", retries=3, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)
def fetch_task(source: SourceConfig, name: str, store_uri: str) -> ModelArtifact:
    """Fetch weights (file/s3/hf), verify every sha256, publish into the store."""
    artifact = fetch(source, name, open_store(store_uri))
    get_run_logger().info("fetch: %s (%d files)", outcome(artifact), len(artifact.files))
    return artifact
