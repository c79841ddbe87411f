"""Task: make the quantized model ready for its device and smoke-test it there."""

from pathlib import Path

from npuflow.tasks.common import outcome
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.artifacts import Deployable, QuantizedArtifact
from npuflow.core.config import ConvertConfig, ServingConfig
from npuflow.core.store import open_store
from npuflow.stages.convert import convert


@task(name="convert", cache_policy=NONE)
def convert_task(quantized: QuantizedArtifact, cfg: ConvertConfig, store_uri: str, cache_dir: Path,
                 serving: ServingConfig | None = None) -> Deployable:
    """Load for the configured device (refused early when its runtime is missing, or when the serving
    engine cannot run the scheme there), one forward pass; the deployable records the engine."""
    d = convert(quantized, cfg, open_store(store_uri), cache_dir, serving)
    get_run_logger().info("convert: %s (%s on %s, %s; engine %s)", outcome(d), d.runtime, d.device_name, d.dtype,
                          d.engine)
    return d
