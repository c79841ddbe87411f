"""Benchmark stage: TTFT and TPOT per scenario with warm-up and repetitions, in a fresh process on the device.

Method: fixed output length (no early stop), `warmup` untimed runs, then at least `iterations` runs
and `min_seconds` seconds, per scenario (batch size x input length x output length). Prefill (TTFT:
prompt in, first token out) and each decode step are timed apart, the backend's clock synchronising
the device around each. TPOT percentiles pool every decode step of every run. The measurement runs
in a child process so that peak memory is the serving process's own; tensor-parallel mode runs one
process per rank under torchrun (npuflow.parallel). Each scenario is set against its roofline.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
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
    staging_dir,
)
from npuflow.backends import get_backend
from npuflow.config import BenchmarkConfig, ScenarioConfig
from npuflow.devices import DEVICES, DeviceSpec, get_device
from npuflow.engine import Engine
from npuflow.errors import NpuflowError
from npuflow.plan import kv_bytes_per_token, model_shape
from npuflow.report import is_unstable, primary, primary_metrics, render, roofline
from npuflow.runtime import DTYPES, load_quantized
from npuflow.store import Store

log = logging.getLogger("npuflow.benchmark")
CODE_VERSION = "benchmark-3"  # 3: the npuflow runtime is timed through the engine
ENERGY_SOURCES = {"cpu": "RAPL package counter", "cuda": "NVML total energy counter",
                  "npu": "npu-smi power sampling"}
# device name fragment -> npuflow.devices key; only names that pin the variant (an A100 40GB is not an
# A100 80GB, an H100 PCIe is not an SXM): anything else gets no peaks rather than a guess
_SPEC_BY_NAME = (("H200", "h200"), ("H100 80GB HBM3", "h100-sxm"), ("A100-SXM4-80GB", "a100-80g"),
                 ("910B1", "ascend-910b1"), ("910B2", "ascend-910b2"), ("910B3", "ascend-910b3"),
                 ("910B4", "ascend-910b4"))


def summarize(values: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean and stdev as % of the mean (linear interpolation between ranks)."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    mean = t.mean().item()
    std = t.std().item() if t.numel() > 1 else 0.0
    return {"p50": q[0], "p90": q[1], "p99": q[2], "mean": mean, "stdev_pct": 100.0 * std / mean if mean else 0.0}


@torch.inference_mode()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) with HF's loop (DynamicCache)."""
    out = model(prompt, use_cache=True)
    tokens = [out.logits[:, -1:].argmax(-1)]
    for _ in range(new_tokens - 1):
        out = model(tokens[-1], cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


class HFLoop:
    """Generation as plain transformers does it: forward with a DynamicCache that grows every step."""

    name = "hf"

    def __init__(self, model, backend):
        self.model, self.backend = model, backend

    @torch.inference_mode()
    def __call__(self, prompt: torch.Tensor, output_len: int) -> tuple[float, list[float], float, torch.Tensor]:
        """prompt (B, T) -> (ttft_ms, per-step decode ms, end-to-end ms, tokens (B, output_len))."""
        now = self.backend.now_ms
        t0 = now()
        out = self.model(prompt, use_cache=True)  # prefill: logits (B, T_in, V) and the KV cache
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        t1 = now()
        steps, tokens, cache = [], [token], out.cache
        for _ in range(output_len - 1):
            s = now()
            out = self.model(token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
            steps.append(now() - s)
            tokens.append(token)
        return t1 - t0, steps, now() - t0, torch.cat(tokens, dim=1)


class EngineLoop:
    """The npuflow runtime's generation: a static KV cache and, in graph mode, a compiled decode step
    (npuflow.engine). One engine per (batch, cache length), so each shape compiles once."""

    name = "engine"

    def __init__(self, model, backend, compile: bool):
        self.model, self.backend, self.compile = model, backend, compile
        self.engines: dict[tuple[int, int], Engine] = {}
        self.first_run_s: dict[tuple[int, int], float] = {}  # includes compilation in graph mode

    @torch.inference_mode()
    def __call__(self, prompt: torch.Tensor, output_len: int) -> tuple[float, list[float], float, torch.Tensor]:
        shape = (prompt.shape[0], prompt.shape[1] + output_len)
        engine = self.engines.get(shape)
        if engine is None:
            engine = self.engines[shape] = Engine(self.model, max_len=shape[1], compile=self.compile)
            t = time.perf_counter()
            engine.generate(prompt, min(output_len, 3))  # the first steps trace and compile in graph mode
            self.first_run_s[shape] = time.perf_counter() - t
        now = self.backend.now_ms
        t0 = now()
        token = engine.prefill(prompt)
        t1 = now()
        steps, tokens = [], [token]
        for _ in range(output_len - 1):
            s = now()
            token = engine.decode(token)
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
                 loop: HFLoop | EngineLoop | None = None) -> tuple[Scenario, float | None]:
    """One scenario (default: cfg's first) in this process; returns it and the energy used in joules
    (None: no counter). `agree` turns this process's "run again?" into every rank's (tensor-parallel).
    `loop` drives generation (default: HF's loop)."""
    sc = scenario or cfg.resolved_scenarios[0]
    gen = loop or HFLoop(model, backend)
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
                   mode: str = "single", devices: int = 1, loop: HFLoop | EngineLoop | None = None,
                   runtime: str = "npuflow-eager") -> dict:
    """Every configured scenario on a loaded model, then the greedy continuation of the first prompt."""
    gen = loop or HFLoop(model, backend)
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


RUNTIMES = ("npuflow", "hf-eager")


def load_runtime(model_dir: Path, backend, dtype: torch.dtype, runtime: str = "npuflow", graph: bool = False,
                 loop: str = "engine"):
    """(model, generation loop, runtime label). npuflow: the quantized artifact on the backend's kernels,
    generated by the engine (static KV cache; decode compiled in graph mode) or, loop "hf", by HF's loop;
    hf-eager: plain transformers on an unquantized checkpoint, HF's loop (the baseline users know)."""
    if runtime == "hf-eager":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(backend.device()).eval()
        return model, HFLoop(model, backend), "hf-eager"
    if runtime != "npuflow":
        raise NpuflowError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    model = load_quantized(model_dir, backend, dtype)
    if loop == "hf":
        return model, HFLoop(model, backend), "npuflow-eager (HF loop)"
    label = "npuflow-graph" if graph else "npuflow-eager"
    return model, EngineLoop(model, backend, compile=graph), label


def measure(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, runtime: str = "npuflow",
            graph: bool = False, loop: str = "engine") -> dict:
    """The single-device measurement (the stage runs it in a child process): load, then every scenario."""
    backend = get_backend(device)
    backend.reset_peak_memory()
    model, gen, label = load_runtime(model_dir, backend, DTYPES[dtype], runtime, graph, loop)
    return measure_loaded(model, backend, cfg, loop=gen, runtime=label)


def peak_spec(device: str, device_name: str, override: str | None = None) -> tuple[DeviceSpec | None, str]:
    """The peak figures the roofline uses, and a note on what is not available (CPU: bandwidth measured)."""
    if override:
        return get_device(override), ""
    if device == "cpu":
        return get_device("cpu"), "MFU not available: no peak FLOPS figure for a CPU (bandwidth is measured)"
    for fragment, key in _SPEC_BY_NAME:
        if fragment.lower() in device_name.lower():
            return DEVICES[key], ""
    return None, (f"roofline not available: no peak figures for {device_name!r}; set benchmark.device_spec "
                  f"to one of {', '.join(DEVICES)}")


def build_report(results: list[dict], model_dir: Path, device: str, device_name: str, cfg: BenchmarkConfig,
                 model_size_bytes: int, *, uri: str, key: str, deployable_manifest_sha256: str = "",
                 label: str | None = None,
                 spec: tuple[DeviceSpec | None, str] | None = None) -> BenchmarkReport:
    """Scenarios of every mode measured (results of measure / parallel.launch) with their rooflines,
    DESIGN.md metrics for the primary scenario, energy as measured or why not."""
    shape = model_shape(str(model_dir))
    dev, note = spec or peak_spec(device, device_name, cfg.device_spec)
    scenarios = []
    for r in results:
        devs = r["devices"]
        share = 1 if device == "cpu" else devs  # CPU ranks share one memory system; accelerators add theirs
        kv = kv_bytes_per_token(shape, r["kv_bytes_per_element"])
        for s in r["scenarios"]:
            sc = Scenario.model_validate(s)
            rl = roofline(shape, sc.batch_size, sc.input_len, sc.output_len, sc.ttft_ms["p50"],
                          sc.tpot_ms["p50"],
                          r["weight_bytes"], kv, dev.bandwidth_gbs * share if dev else None,
                          dev.fp16_tflops * devs if dev and dev.fp16_tflops else None, note)
            scenarios.append(sc.model_copy(update={"roofline": rl}))
    first = results[0]
    energy_used = [s for s in scenarios if s.energy_joules is not None]
    energy = (f"{ENERGY_SOURCES.get(device, device)}: {sum(s.energy_joules or 0 for s in energy_used):.1f} J "
              f"over {len(energy_used)} scenario runs (tensor-parallel: rank 0's counter)" if energy_used
              else first["energy_note"])
    method = {
        "model": label or model_dir.name, "mode": cfg.mode, "tp": cfg.tp, "warmup": cfg.warmup,
        "iterations": cfg.iterations, "min_seconds": cfg.min_seconds,
        "stability_stdev_pct_max": cfg.stability_stdev_pct_max,
        "tpot_regression_pct": cfg.tpot_regression_pct,
        "timing": f"the {device} backend's clock (now_ms synchronises the device)",
        "runtime": {r["mode"]: r.get("runtime", "") for r in results},
        "first_run_s": {r["mode"]: r.get("first_run_s", {}) for r in results},
    }
    peaks = {"device_spec": dev.name if dev else None, "bandwidth_gbs": dev.bandwidth_gbs if dev else None,
             "fp16_tflops": (dev.fp16_tflops or None) if dev else None, "source": dev.source if dev else note,
             "weight_bytes": first["weight_bytes"], "kv_bytes_per_token": kv_bytes_per_token(
                 shape, first["kv_bytes_per_element"]), "params": shape.params}
    by_mode = {r["mode"]: r for r in results}
    mode_result = by_mode.get(cfg.mode, first)
    report = BenchmarkReport(
        uri=uri, key=key, deployable_manifest_sha256=deployable_manifest_sha256, device=device,
        device_name=device_name, scenarios=scenarios, metrics={},
        peak_memory_mb=mode_result["peak_memory_mb"], model_size_mb=model_size_bytes / 1e6, energy=energy,
        roofline=peaks, method=method,
        greedy_tokens={r["mode"]: r["greedy_tokens"] for r in results},
    )
    metrics = primary_metrics(primary(report), report.peak_memory_mb, report.model_size_mb)
    return report.model_copy(update={"metrics": metrics})


def check_scenarios_fit(model_dir: Path, cfg: BenchmarkConfig) -> None:
    """Every scenario's prompt + output within the model's positions, before any work."""
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    too_long = [s.name for s in cfg.resolved_scenarios if limit and s.input_len + s.output_len > limit]
    if too_long:
        raise NpuflowError(
            f"benchmark scenario(s) {', '.join(too_long)} need more than the model's {limit} positions "
            f"(max_position_embeddings): set benchmark.scenarios (or matrix) with input_len + output_len <= {limit}")


def benchmark_dir(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig,
                  single_baseline: bool = True, runtime: str = "npuflow", graph: bool = False) -> BenchmarkReport:
    """`npuflow benchmark`: single device in this process; mode tensor-parallel adds cfg.tp ranks under
    torchrun (and keeps the single-device run as its baseline unless `single_baseline` is False; both
    then use HF's loop, which the sharded model runs)."""
    check_scenarios_fit(model_dir, cfg)
    loop = "hf" if cfg.mode == "tensor-parallel" else "engine"
    results = ([measure(model_dir, device, dtype, cfg, runtime, graph, loop)]
               if cfg.mode == "single" or single_baseline else [])
    if cfg.mode == "tensor-parallel":
        from npuflow.parallel import launch

        results.append(launch(model_dir, device, dtype, cfg, cfg.tp))
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return build_report(results, model_dir, device, get_backend(device).device_name(), cfg, size,
                        uri=model_dir.resolve().as_uri(), key=model_dir.name)


def _measure_in_child(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, graph: bool) -> dict:
    cmd = [sys.executable, "-m", "npuflow.benchmark", str(model_dir), device, dtype, cfg.model_dump_json()]
    cmd += ["--graph"] if graph else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NpuflowError(f"the benchmark process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    check_scenarios_fit(model_dir, cfg)
    scenarios = cfg.resolved_scenarios
    log.info("benchmarking %d scenario(s) (%s): %d warm-up + >= %d runs and >= %g s each", len(scenarios),
             ", ".join(s.name for s in scenarios), cfg.warmup, cfg.iterations, cfg.min_seconds)
    if cfg.mode == "tensor-parallel":  # the mode being released only: the model may not fit one device
        from npuflow.parallel import launch

        log.info("tensor-parallel: %d ranks", cfg.tp)
        results = [launch(model_dir, deployable.device, deployable.dtype, cfg, cfg.tp)]
    else:
        results = [_measure_in_child(model_dir, deployable.device, deployable.dtype, cfg,
                                     deployable.runtime == "npuflow-graph")]
    report = build_report(results, model_dir, deployable.device, deployable.device_name, cfg,
                          quantized.size_bytes, uri=store.url(key), key=key,
                          deployable_manifest_sha256=deployable.manifest_sha256, label=deployable.name)
    m = report.metrics
    log.info("TTFT p50 %.2f ms, TPOT p50 %.2f ms (%.1f tok/s), MBU %s, peak memory %.0f MB", m["ttft_ms_p50"],
             m["tpot_ms_p50"], m["decode_tokens_per_s"],
             f"{m['mbu_pct']:.1f}%" if "mbu_pct" in m else "n/a", m["peak_memory_mb"])
    with staging_dir("benchmark") as tmp:
        files = render(report, Path(tmp), tpot_regression_pct=cfg.tpot_regression_pct)
        report = report.model_copy(update={"report_files": [p.name for p in files]})
        return publish(store, report, Path(tmp))


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
