"""Benchmark stage: TTFT and TPOT with warm-up and repetitions, in a fresh process on the target device.

Method: fixed output length (no early stop), `warmup` untimed runs, then at least `iterations` runs
and `min_seconds` seconds. Prefill (TTFT: prompt in, first token out) and each decode step are timed
apart, synchronising the device around each. TPOT percentiles pool every decode step of every run.
The measurement runs in a child process so that peak memory is the serving process's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from npuflow.artifacts import (
    BenchmarkReport,
    Deployable,
    QuantizedArtifact,
    Scenario,
    digest,
    load_manifest,
    materialize,
    publish,
)
from npuflow.backends import get_backend
from npuflow.config import BenchmarkConfig
from npuflow.errors import NpuflowError
from npuflow.runtime import DTYPES, load_quantized
from npuflow.store import Store

log = logging.getLogger("npuflow.benchmark")
CODE_VERSION = "benchmark-1"


def summarize(values: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean and stdev as % of the mean (linear interpolation between ranks)."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    mean = t.mean().item()
    std = t.std().item() if t.numel() > 1 else 0.0
    return {"p50": q[0], "p90": q[1], "p99": q[2], "mean": mean, "stdev_pct": 100.0 * std / mean if mean else 0.0}


@torch.inference_mode()
def timed_generation(model, backend, prompt: torch.Tensor, output_len: int) -> tuple[float, list[float], float]:
    """Greedy decode of exactly output_len tokens; returns (ttft_ms, per-step decode ms, end-to-end ms)."""
    t0 = backend.now_ms()
    out = model(prompt, use_cache=True)  # prefill: (B, T_in) -> logits (B, T_in, V), KV cache
    token = out.logits[:, -1:].argmax(-1)  # (B, 1)
    t1 = backend.now_ms()
    steps = []
    cache = out.cache
    for _ in range(output_len - 1):
        s = backend.now_ms()
        out = model(token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        steps.append(backend.now_ms() - s)
    return t1 - t0, steps, backend.now_ms() - t0


@torch.inference_mode()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) with the same loop the benchmark times."""
    out = model(prompt, use_cache=True)
    tokens = [out.logits[:, -1:].argmax(-1)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def run_scenario(model, backend, cfg: BenchmarkConfig, vocab_size: int) -> tuple[Scenario, float | None]:
    """One scenario in this process; returns it and the energy used in joules (None: no counter)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (cfg.batch_size, cfg.input_len), generator=gen).to(backend.device())
    for _ in range(cfg.warmup):
        timed_generation(model, backend, prompt, cfg.output_len)
    ttfts, steps, e2es = [], [], []
    e0, start = backend.energy_joules(), time.perf_counter()
    while len(ttfts) < cfg.iterations or time.perf_counter() - start < cfg.min_seconds:
        ttft, st, e2e = timed_generation(model, backend, prompt, cfg.output_len)
        ttfts.append(ttft)
        steps += st
        e2es.append(e2e)
    e1 = backend.energy_joules()
    ttft_s, tpot_s, e2e_s = summarize(ttfts), summarize(steps), summarize(e2es)
    scenario = Scenario(
        name=f"bs{cfg.batch_size}_in{cfg.input_len}_out{cfg.output_len}", batch_size=cfg.batch_size,
        input_len=cfg.input_len, output_len=cfg.output_len, iterations=len(ttfts), ttft_ms=ttft_s, tpot_ms=tpot_s,
        decode_tokens_per_s=cfg.batch_size * 1e3 / tpot_s["p50"],
        throughput_tokens_per_s=cfg.batch_size * cfg.output_len * 1e3 / e2e_s["p50"], e2e_ms_p50=e2e_s["p50"],
    )
    energy = None if e0 is None or e1 is None else e1 - e0
    return scenario, energy


def measure(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig) -> dict:
    """The measurement itself (run in the child process): load, then time the scenario."""
    backend = get_backend(device)
    backend.reset_peak_memory()
    model = load_quantized(model_dir, backend, DTYPES[dtype])
    scenario, energy = run_scenario(model, backend, cfg, model.config.vocab_size)
    generated = scenario.batch_size * scenario.output_len * scenario.iterations
    return {
        "scenario": scenario.model_dump(),
        "peak_memory_mb": backend.peak_memory_mb(),
        "energy_joules": energy,
        "energy_tokens_per_j": generated / energy if energy else None,
        "energy_note": backend.energy_unavailable() if energy is None else f"{device} counter, {energy:.1f} J",
    }


def benchmark(deployable: Deployable, cfg: BenchmarkConfig, store: Store, cache_root: Path) -> BenchmarkReport:
    """The benchmark stage: cache hit when this deployable was measured with this config."""
    key = f"models/{deployable.name}/benchmark/" + digest(deployable.manifest_sha256, cfg, CODE_VERSION)[:16]
    found = load_manifest(store, key, BenchmarkReport)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found
    get_backend(deployable.device)
    quantized = load_manifest(store, deployable.quantized_key, QuantizedArtifact)
    if quantized is None:
        raise NpuflowError(f"the quantized weights {deployable.quantized_key} are gone from the store; re-run quantize")
    model_dir = materialize(store, quantized.key, quantized.files, cache_root)
    log.info("benchmarking bs=%d in=%d out=%d: %d warm-up + >= %d runs", cfg.batch_size, cfg.input_len,
             cfg.output_len, cfg.warmup, cfg.iterations)
    cmd = [sys.executable, "-m", "npuflow.benchmark", str(model_dir), deployable.device, deployable.dtype,
           cfg.model_dump_json()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NpuflowError(f"the benchmark process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    scenario = Scenario.model_validate(result["scenario"])
    metrics = {
        "ttft_ms_p50": scenario.ttft_ms["p50"], "ttft_ms_p90": scenario.ttft_ms["p90"],
        "tpot_ms_p50": scenario.tpot_ms["p50"], "tpot_ms_p90": scenario.tpot_ms["p90"],
        "decode_tokens_per_s": scenario.decode_tokens_per_s,
        "throughput_tokens_per_s": scenario.throughput_tokens_per_s,
        "peak_memory_mb": result["peak_memory_mb"], "model_size_mb": quantized.size_bytes / 1e6,
    }
    if result["energy_tokens_per_j"]:
        metrics["energy_tokens_per_j"] = result["energy_tokens_per_j"]
    report = BenchmarkReport(
        uri=store.url(key), key=key, deployable_manifest_sha256=deployable.manifest_sha256, device=deployable.device,
        device_name=deployable.device_name, scenarios=[scenario], metrics=metrics,
        peak_memory_mb=result["peak_memory_mb"], model_size_mb=quantized.size_bytes / 1e6,
        energy=result["energy_note"],
    )
    log.info("TTFT p50 %.2f ms, TPOT p50 %.2f ms (%.1f tok/s), peak memory %.0f MB", metrics["ttft_ms_p50"],
             metrics["tpot_ms_p50"], metrics["decode_tokens_per_s"], metrics["peak_memory_mb"])
    return publish(store, report)


def _main() -> None:
    p = argparse.ArgumentParser(description="npuflow benchmark worker (run by the benchmark stage)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("device")
    p.add_argument("dtype")
    p.add_argument("config_json")
    a = p.parse_args()
    result = measure(a.model_dir, a.device, a.dtype, BenchmarkConfig.model_validate_json(a.config_json))
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
