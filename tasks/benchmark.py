"""Task: latency and throughput of the deployable on its device."""

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.artifacts import BenchmarkReport, Deployable
from npuflow.benchmark import benchmark
from npuflow.config import BenchmarkConfig
from npuflow.store import open_store
from tasks.common import outcome


@task(name="benchmark", cache_policy=NONE)
def benchmark_task(deployable: Deployable, cfg: BenchmarkConfig, store_uri: str, cache_dir: Path) -> BenchmarkReport:
    """TTFT/TPOT percentiles, decode tokens/s, peak memory, model size."""
    b = benchmark(deployable, cfg, open_store(store_uri), cache_dir)
    get_run_logger().info("benchmark: %s; TPOT p50 %.2f ms", outcome(b), b.metrics["tpot_ms_p50"])
    return b
