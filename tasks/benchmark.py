"""Task: latency and throughput of the deployable on its device."""

from pathlib import Path

from npuflow.tasks.common import outcome
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from npuflow.bench.stage import benchmark
from npuflow.core.artifacts import BenchmarkReport, Deployable
from npuflow.core.config import BenchmarkConfig
from npuflow.core.store import open_store


@task(name="benchmark", cache_policy=NONE)
def benchmark_task(deployable: Deployable, cfg: BenchmarkConfig, store_uri: str, cache_dir: Path) -> BenchmarkReport:
    """Every configured scenario: TTFT/TPOT percentiles, tokens/s, roofline, memory; report files too."""
    b = benchmark(deployable, cfg, open_store(store_uri), cache_dir)
    unstable = [s.name for s in b.scenarios if s.unstable]
    get_run_logger().info("benchmark: %s; %d scenario(s), TPOT p50 %.2f ms%s", outcome(b), len(b.scenarios),
                          b.metrics["tpot_ms_p50"], f"; unstable: {', '.join(unstable)}" if unstable else "")
    return b
