"""Benchmark: two back-to-back benchmark runs of the same quantized demo model agree on TPOT p50.

    .venv/bin/python benchmarks/repeatability.py [--threads 1] [--seconds 2]

Builds the demo model, quantizes it (w8a16), runs `npuflow.bench.measure.measure` twice in a row and
prints both TPOT p50 values and their relative difference (target <= 10%). One intra-op thread by
default: on a shared 2-core machine a 2-thread OpenMP team stalls whenever another process takes a
core, while a single thread only loses whole steps, which the median ignores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from npuflow.bench.measure import measure
from npuflow.core.config import BenchmarkConfig, QuantizationConfig
from npuflow.demo.tinymodel import build_tiny_llama
from npuflow.quant.streaming import quantize_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = BenchmarkConfig(batch_size=1, input_len=64, output_len=32, warmup=3, iterations=20, min_seconds=a.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        src = build_tiny_llama(Path(tmp) / "tiny-llama")
        q = Path(tmp) / "w8a16"
        q.mkdir()
        quantize_dir(src, q, QuantizationConfig())
        runs = [measure(q, "cpu", "float32", cfg)["scenarios"][0] for _ in range(2)]
    (x, y) = (r["tpot_ms"]["p50"] for r in runs)
    diff = abs(x - y) / min(x, y)
    print(f"run 1: TPOT p50 {x:.4f} ms ({runs[0]['iterations']} runs)   run 2: TPOT p50 {y:.4f} ms "
          f"({runs[1]['iterations']} runs)")
    print(f"difference {100 * diff:.1f}%   (target <= 10%)   {'OK' if diff <= 0.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
