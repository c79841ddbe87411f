"""Benchmark: the CPU W8A8 linear (int8 GEMM, per-token activations) against W8A16 and bf16 at decode batch sizes.

    .venv/bin/python benchmarks/w8a8_linear.py [--shapes 4096x4096,11008x4096] [--rows 1,16] [--iters 50]

Prints the fastest time per call (ms) of each kernel over the iterations (the least disturbed by other load on a
shared machine) and the ratio W8A16 / W8A8 (> 1: W8A8 faster). Inputs are bf16 (the CPU backend's dtype);
weights random; --threads 1 keeps other processes' cores out of it.
"""

from __future__ import annotations

import argparse
import time

import torch

from npuflow.quant.schemes import W8A8
from npuflow.runtime.backends import cpu


def _best_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,1024x1024,2816x1024")  # out x in
    p.add_argument("--rows", default="1,16")  # tokens per call (decode batch)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)  # torch intra-op threads; 0: torch's default
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"{'shape':>12} {'rows':>4} {'bf16 ms':>8} {'w8a16 ms':>9} {'w8a8 ms':>8} {'w8a16/w8a8':>10}")
    for shape in a.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w = torch.randn(out_f, in_f) * 0.02
        qw = W8A8(dynamic=True).quantize(w)
        wb = w.to(torch.bfloat16)
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, in_f).to(torch.bfloat16)
            with torch.inference_mode():
                t_bf16 = _best_ms(lambda: torch.nn.functional.linear(x, wb), a.iters)  # noqa: B023
                t_w8a16 = _best_ms(lambda: cpu.linear_w8a16(x, qw.qweight, qw.scale), a.iters)  # noqa: B023
                t_w8a8 = _best_ms(lambda: cpu.linear_w8a8(x, qw.qweight, qw.scale), a.iters)  # noqa: B023
            print(f"{shape:>12} {rows:>4} {t_bf16:8.3f} {t_w8a16:9.3f} {t_w8a8:8.3f} {t_w8a16 / t_w8a8:10.2f}")


if __name__ == "__main__":
    main()
