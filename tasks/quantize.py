"""Task: quantize the fetched weights."""

from pathlib import Path

from npuflow.tasks.common import IO_RETRY_DELAYS, outcome, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.core.artifacts import ModelArtifact, QuantizedArtifact
from npuflow.core.config import QuantizationConfig, ValidationConfig
from npuflow.core.store import open_store
from npuflow.quant.stage import quantize


@task(name="quantize", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)
def quantize_task(model: ModelArtifact, cfg: QuantizationConfig, store_uri: str, cache_dir: Path,
                  validation: ValidationConfig | None = None) -> QuantizedArtifact:
    """Weight-only quantization, streamed shard by shard (fallback auto scores against the validation gates)."""
    q = quantize(model, cfg, open_store(store_uri), cache_dir, validation)
    get_run_logger().info("quantize: %s (%s, %.2f MB)", outcome(q), q.scheme, q.size_bytes / 1e6)
    return q
