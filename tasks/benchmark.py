"""Task: latency and throughput of the deployable on its device."""

from pathlib import Path

from npuflow.tasks.common import IO_RETRY_DELAYS, outcome, retry_io_only
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.bench.stage import benchmark
from npuflow.core.artifacts import BenchmarkReport, Deployable
from npuflow.core.config import BenchmarkConfig
from npuflow.core.store import open_store


@task(name="benchmark", retries=2, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only,
      cache_policy=NONE)  # store I/O that a retry can fix (the stages are content-addressed: a retry republishes nothing)
def benchmark_task(deployable: Deployable, cfg: BenchmarkConfig, store_uri: str, cache_dir: Path) -> BenchmarkReport:
    """Every configured scenario: TTFT/TPOT percentiles, tokens/s, roofline, memory; report files too."""
    b = benchmark(deployable, cfg, open_store(store_uri), cache_dir)
    unstable = [s.name for s in b.scenarios if s.unstable]
    get_run_logger().info("benchmark: %s; %d scenario(s), TPOT p50 %.2f ms%s", outcome(b), len(b.scenarios),
                          b.metrics["tpot_ms_p50"], f"; unstable: {', '.join(unstable)}" if unstable else "")
    return b
