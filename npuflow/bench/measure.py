"""Benchmark measurement in this process: the scenarios on a loaded model, timed through the engine.

`python -m npuflow.bench.measure MODEL_DIR DEVICE DTYPE CONFIG_JSON [--graph]` is the child process the
benchmark stage runs (so peak memory is the serving process's own).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from npuflow.bench.report import is_unstable
from npuflow.core.artifacts import Scenario
from npuflow.core.config import BenchmarkConfig, ScenarioConfig
from npuflow.core.errors import NpuflowError
from npuflow.core.names import Runtime, runtime_label
from npuflow.runtime.backends import get_backend
from npuflow.runtime.engine import Engine, SamplingParams
from npuflow.runtime.loader import DTYPES, load_quantized
from npuflow.runtime.scheduler import Scheduler, generate

log = logging.getLogger("npuflow.benchmark")


def summarize(values: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean and stdev as % of the mean (linear interpolation between ranks)."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    mean = t.mean().item()
    std = t.std().item() if t.numel() > 1 else 0.0
    return {"p50": q[0], "p90": q[1], "p99": q[2], "mean": mean, "stdev_pct": 100.0 * std / mean if mean else 0.0}


class EngineLoop:
    """Timed generation through the runtime's engine and scheduler (continuous batching, as served):
    the scenario's B rows are B sequences submitted together, each in its own slot. TTFT: submission to
    the last row's first token; decode times: every sequence's intervals between tokens, pooled (the
    inter-token latency a client sees). One engine per (batch, cache length)."""

    name = "engine"

    def __init__(self, model, backend, compile: bool = False):
        self.model, self.backend, self.compile = model, backend, compile
        self.engines: dict[tuple[int, int], Engine] = {}
        self.first_run_s: dict[tuple[int, int], float] = {}  # includes compilation in graph mode

    @torch.inference_mode()
    def __call__(self, prompt: torch.Tensor, output_len: int) -> tuple[float, list[float], float, torch.Tensor]:
        """prompt (B, T) -> (ttft_ms, per-token decode ms, end-to-end ms, tokens (B, output_len))."""
        shape = (prompt.shape[0], prompt.shape[1] + output_len)
        engine = self.engines.get(shape)
        if engine is None:
            engine = self.engines[shape] = Engine(self.model, max_len=shape[1], slots=shape[0], compile=self.compile)
            t = time.perf_counter()
            generate(engine, prompt, min(output_len, 3))  # the first steps trace and compile in graph mode
            self.first_run_s[shape] = time.perf_counter() - t
        sched = Scheduler(engine)
        params = SamplingParams(max_tokens=output_len)  # fixed length: no stop token
        t0 = time.perf_counter()
        seqs = [sched.submit(row.tolist(), params) for row in prompt]
        sched.run_until_done()
        t1 = time.perf_counter()
        ttft = max(s.first_token_at for s in seqs) - t0
        steps = [(b - a) * 1e3 for s in seqs for a, b in itertools.pairwise(s.token_times)]
        tokens = torch.tensor([s.output_ids for s in seqs])
        return ttft * 1e3, steps, (t1 - t0) * 1e3, tokens


class HFBaseline:
    """The hf-eager baseline: plain transformers' loop (forward with a DynamicCache that grows each step),
    what a user without npuflow runs. Not served; timed only to compare with."""

    name = "hf"

    def __init__(self, model, backend):
        self.model, self.backend = model, backend
        self.first_run_s: dict[tuple[int, int], float] = {}  # nothing compiles

    @torch.inference_mode()
    def __call__(self, prompt: torch.Tensor, output_len: int) -> tuple[float, list[float], float, torch.Tensor]:
        now = self.backend.now_ms
        t0 = now()
        out = self.model(prompt, use_cache=True)  # prefill: logits (B, T_in, V) and the KV cache
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        t1 = now()
        steps, tokens = [], [token]
        for _ in range(output_len - 1):
            s = now()
            out = self.model(token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(now() - s)
            tokens.append(token)
        return t1 - t0, steps, now() - t0, torch.cat(tokens, dim=1)


def make_prompt(sc: ScenarioConfig, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The scenario's prompt (B, T_in): seeded random tokens, the same in every process and mode."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (sc.batch_size, sc.input_len), generator=gen).to(device)


def _alone(go: bool) -> bool:
    return go


def run_scenario(model, backend, cfg: BenchmarkConfig, vocab_size: int,
                 scenario: ScenarioConfig | None = None,
                 agree: Callable[[bool], bool] = _alone,
                 loop: EngineLoop | HFBaseline | None = None) -> tuple[Scenario, float | None]:
    """One scenario (default: cfg's first) in this process; returns it and the energy used in joules
    (None: no counter). `agree` turns this process's "run again?" into every rank's (tensor-parallel).
    `loop` drives generation (default: the engine, eager)."""
    sc = scenario or cfg.resolved_scenarios[0]
    gen = loop or EngineLoop(model, backend)
    prompt = make_prompt(sc, vocab_size, backend.device())
    for _ in range(cfg.warmup):
        gen(prompt, sc.output_len)
    ttfts, steps, e2es = [], [], []
    e0, start = backend.energy_joules(), time.perf_counter()
    while agree(len(ttfts) < cfg.iterations or time.perf_counter() - start < cfg.min_seconds):
        ttft, st, e2e, _ = gen(prompt, sc.output_len)
        ttfts.append(ttft)
        steps += st
        e2es.append(e2e)
    e1 = backend.energy_joules()
    ttft_s, tpot_s, e2e_s = summarize(ttfts), summarize(steps), summarize(e2es)
    # a counter that did not advance (or wrapped, as RAPL does) measured nothing: report no number
    energy = None if e0 is None or e1 is None or e1 <= e0 else e1 - e0
    generated = sc.batch_size * sc.output_len * len(ttfts)
    scenario_ = Scenario(
        name=sc.name, batch_size=sc.batch_size, input_len=sc.input_len, output_len=sc.output_len,
        iterations=len(ttfts), ttft_ms=ttft_s, tpot_ms=tpot_s,
        decode_tokens_per_s=sc.batch_size * 1e3 / tpot_s["p50"],
        throughput_tokens_per_s=sc.batch_size * sc.output_len * 1e3 / e2e_s["p50"], e2e_ms_p50=e2e_s["p50"],
        e2e_ms=e2e_s, unstable=is_unstable(tpot_s, cfg.stability_stdev_pct_max), energy_joules=energy,
        energy_tokens_per_j=generated / energy if energy else None,
    )
    return scenario_, energy


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as loaded (parameters and buffers, shared storage counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total


def measure_loaded(model, backend, cfg: BenchmarkConfig, agree: Callable[[bool], bool] = _alone,
                   mode: str = "single", devices: int = 1, loop: EngineLoop | HFBaseline | None = None,
                   runtime: str = "npuflow-eager") -> dict:
    """Every configured scenario on a loaded model, then the greedy continuation of the first prompt."""
    gen = loop or EngineLoop(model, backend)
    scenarios = []
    vocab = model.config.vocab_size
    for sc in cfg.resolved_scenarios:
        backend.reset_peak_memory()
        s, _ = run_scenario(model, backend, cfg, vocab, sc, agree, gen)
        scenarios.append(s.model_copy(update={"mode": mode, "devices": devices,
                                              "peak_memory_mb": backend.peak_memory_mb()}).model_dump())
        log.info("%s %s: TTFT p50 %.2f ms, TPOT p50 %.3f ms (stdev %.1f%%)", mode, sc.name, s.ttft_ms["p50"],
                 s.tpot_ms["p50"], s.tpot_ms["stdev_pct"])
    first = cfg.resolved_scenarios[0]
    tokens = gen(make_prompt(first, vocab, backend.device()), first.output_len)[3]
    return {
        "mode": mode, "devices": devices, "scenarios": scenarios, "runtime": runtime, "loop": gen.name,
        "first_run_s": {f"bs{b}_len{n}": round(t, 3) for (b, n), t in getattr(gen, "first_run_s", {}).items()},
        "peak_memory_mb": max(s["peak_memory_mb"] or 0.0 for s in scenarios),
        "weight_bytes": model_bytes(model), "kv_bytes_per_element": torch.finfo(model.dtype).bits // 8,
        "greedy_tokens": tokens.tolist(), "energy_note": backend.energy_unavailable(),
    }


RUNTIMES = (Runtime.NPUFLOW, Runtime.HF_EAGER)


def load_runtime(model_dir: Path, backend, dtype: torch.dtype, runtime: str = Runtime.NPUFLOW,
                 graph: bool = False):
    """(model, generation loop, runtime label). npuflow: the quantized artifact on the backend's kernels,
    generated by the engine (static KV cache; decode compiled in graph mode); hf-eager: plain
    transformers on an unquantized checkpoint, the engine on HF's DynamicCache (the baseline users know)."""
    if runtime == Runtime.HF_EAGER:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(backend.device()).eval()
        return model, HFBaseline(model, backend), Runtime.HF_EAGER
    if runtime != Runtime.NPUFLOW:
        raise NpuflowError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    model = load_quantized(model_dir, backend, dtype)
    return model, EngineLoop(model, backend, compile=graph), runtime_label(graph)


def measure(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, runtime: str = Runtime.NPUFLOW,
            graph: bool = False) -> dict:
    """The single-device measurement (the stage runs it in a child process): load, then every scenario."""
    backend = get_backend(device)
    backend.reset_peak_memory()
    model, gen, label = load_runtime(model_dir, backend, DTYPES[dtype], runtime, graph)
    return measure_loaded(model, backend, cfg, loop=gen, runtime=label)


def _main() -> None:
    p = argparse.ArgumentParser(description="npuflow benchmark worker (run by the benchmark stage)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("device")
    p.add_argument("dtype")
    p.add_argument("config_json")
    p.add_argument("--graph", action="store_true", help="compile the decode step (the deployable's graph mode)")
    a = p.parse_args()
    result = measure(a.model_dir, a.device, a.dtype, BenchmarkConfig.model_validate_json(a.config_json),
                     graph=a.graph)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
