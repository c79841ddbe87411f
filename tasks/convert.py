"""Task: make the quantized model ready for its device and smoke-test it there."""

from pathlib import Path

from npuflow.tasks.common import IO_RETRY_DELAYS, outcome, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.artifacts import Deployable, QuantizedArtifact
from npuflow.core.config import ConvertConfig, ServingConfig
from npuflow.core.store import open_store
from npuflow.stages.convert import convert


@task(name="convert", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)  # store I/O that a retry can fix (the stages are content-addressed: a retry republishes nothing)
def convert_task(quantized: QuantizedArtifact, cfg: ConvertConfig, store_uri: str, cache_dir: Path,
                 serving: ServingConfig | None = None) -> Deployable:
    """Load for the configured device (refused early when its runtime is missing, or when the serving
    engine cannot run the scheme there), one forward pass; the deployable records the engine."""
    d = convert(quantized, cfg, open_store(store_uri), cache_dir, serving)
    get_run_logger().info("convert: %s (%s on %s, %s; engine %s)", outcome(d), d.runtime, d.device_name, d.dtype,
                          d.engine)
    return d
