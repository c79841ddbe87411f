"""Benchmark stage: TTFT and TPOT per scenario with warm-up and repetitions, in a fresh process on the device.

Method: fixed output length (no early stop), `warmup` untimed runs, then at least `iterations` runs
and `min_seconds` seconds, per scenario (batch size x input length x output length). Prefill (TTFT:
prompt in, first token out) and each decode step are timed apart, the backend's clock synchronising
the device around each. TPOT percentiles pool every decode step of every run. The measurement runs
in a child process so that peak memory is the serving process's own; tensor-parallel mode runs one
process per rank under torchrun (npuflow.bench.parallel). Each scenario is set against its roofline.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from npuflow.bench.devices import DEVICES, DeviceSpec, get_device
from npuflow.bench.measure import measure
from npuflow.bench.plan import kv_bytes_per_token, model_shape
from npuflow.bench.report import primary, primary_metrics, render, roofline
from npuflow.core.artifacts import (
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
from npuflow.core.config import BenchmarkConfig
from npuflow.core.errors import NpuflowError
from npuflow.core.names import Runtime
from npuflow.core.store import Store
from npuflow.runtime.backends import get_backend

log = logging.getLogger("npuflow.benchmark")
CODE_VERSION = "benchmark-7"  # 4: timed through the scheduler, as served; 5: batched prefill, serving scenario;
# 6: the serving load greedy, one engine thread; 7: tp/pp: communication share, per-rank memory, planner figures
ENERGY_SOURCES = {"cpu": "RAPL package counter", "cuda": "NVML total energy counter",
                  "npu": "npu-smi power sampling"}
# device name fragment -> npuflow.bench.devices key; only names that pin the variant (an A100 40GB is not an
# A100 80GB, an H100 PCIe is not an SXM): anything else gets no peaks rather than a guess
_SPEC_BY_NAME = (("H200", "h200"), ("H100 80GB HBM3", "h100-sxm"), ("A100-SXM4-80GB", "a100-80g"),
                 ("910B1", "ascend-910b1"), ("910B2", "ascend-910b2"), ("910B3", "ascend-910b3"),
                 ("910B4", "ascend-910b4"))


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
        "model": label or model_dir.name, "mode": cfg.mode, "tp": cfg.tp, "pp": cfg.pp, "warmup": cfg.warmup,
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
    parallel = by_mode.get(cfg.mode) if cfg.mode != "single" else None
    report = BenchmarkReport(
        uri=uri, key=key, deployable_manifest_sha256=deployable_manifest_sha256, device=device,
        device_name=device_name, scenarios=scenarios, metrics={},
        peak_memory_mb=mode_result["peak_memory_mb"], model_size_mb=model_size_bytes / 1e6, energy=energy,
        roofline=peaks, method=method,
        greedy_tokens={r["mode"]: r["greedy_tokens"] for r in results},
        ranks=parallel.get("ranks", []) if parallel else [],
        planned=planned(model_dir, device, dev, cfg, [s for s in scenarios if s.mode == cfg.mode]) if parallel else {},
    )
    metrics = primary_metrics(primary(report), report.peak_memory_mb, report.model_size_mb)
    return report.model_copy(update={"metrics": metrics})


PRECISIONS = {"w8a16": "w8a16", "w4a16": "w4a16", "w8a8": "w8a16", "w8a8-dynamic": "w8a16"}  # int8 weights alike


def planned(model_dir: Path, device: str, dev: DeviceSpec | None, cfg: BenchmarkConfig,
            scenarios: list[Scenario]) -> dict:
    """bench/plan.py's predictions for the measured tp x pp layout: per-device memory (plan_layout) and, for a
    pure tensor- or pipeline-parallel layout (the planner's modes), TPOT bound, expected range and communication
    per scenario. CPU ranks share one memory system (bandwidth / ranks each) and have no link figure (no
    communication prediction). {} when there are no device figures."""
    from npuflow.bench.plan import plan, plan_layout

    if dev is None:
        return {}
    qm = model_dir / "quant_manifest.json"
    scheme = json.loads(qm.read_text()).get("scheme") if qm.is_file() else None
    precision = PRECISIONS.get(scheme, "fp16") if scheme else "fp16"
    world, shape = cfg.tp * cfg.pp, str(model_dir)
    spec = dev.model_copy(update={"bandwidth_gbs": dev.bandwidth_gbs / world}) if device == "cpu" else dev
    no_link = spec.link_gbs <= 0
    if no_link:  # the planner divides by it; no communication figure is claimed
        spec = spec.model_copy(update={"link_gbs": float("inf")})
    first = scenarios[0] if scenarios else None
    context = first.input_len + first.output_len if first else 4096
    layout = plan_layout(shape, device, precision, cfg.tp, cfg.pp, context, first.batch_size if first else 1, spec)
    out: dict = {"precision": precision, "device_spec": dev.name, "layout": layout, "scenarios": {},
                 "note": ("CPU: the ranks share one memory system (bandwidth / ranks each); no link bandwidth "
                          "figure, so no communication prediction") if device == "cpu" else ""}
    if cfg.tp > 1 and cfg.pp > 1:
        out["note"] = (out["note"] + "; " if out["note"] else "") + "the planner models tp or pp alone: no TPOT prediction"
        return out
    for s in scenarios:
        p = plan(shape, device, precision, s.input_len + s.output_len, s.batch_size, world, spec=spec).modes[cfg.mode]
        out["scenarios"][s.name] = {"tpot_ms_bound": p.tpot_ms_bound, "tpot_ms_expected": list(p.tpot_ms_expected),
                                    "comm_ms": None if no_link else p.comm_ms}
    return out


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
    then run the engine eagerly, as the sharded ranks do)."""
    check_scenarios_fit(model_dir, cfg)
    check_load_tool(cfg)
    tp = cfg.mode != "single"  # tensor- or pipeline-parallel: ranks under torchrun
    results = ([measure(model_dir, device, dtype, cfg, runtime, graph and not tp)]
               if cfg.mode == "single" or single_baseline else [])
    if tp:
        from npuflow.bench.parallel import launch

        results.append(launch(model_dir, device, dtype, cfg))
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    report = build_report(results, model_dir, device, get_backend(device).device_name(), cfg, size,
                          uri=model_dir.resolve().as_uri(), key=model_dir.name)
    return with_serving_load(report, model_dir, device, cfg, graph and runtime == "npuflow")


def check_load_tool(cfg: BenchmarkConfig) -> None:
    """The serving scenario's load tool is installed (before any work), when the config asks for it."""
    if cfg.serving_load is not None:
        from npuflow.bench.load import load_tool

        load_tool(cfg.serving_load)


def with_serving_load(report: BenchmarkReport, model_dir: Path, device: str, cfg: BenchmarkConfig, graph: bool,
                      engine: str = "npuflow") -> BenchmarkReport:
    """The report with the serving scenario added when cfg.serving_load asks for it (the model behind
    `npuflow serve`, in the benchmarked mode's tp x pp layout; vllm bench serve's concurrency sweep); unchanged
    otherwise."""
    if cfg.serving_load is None:
        return report
    from npuflow.bench.load import run_sweep

    load = cfg.serving_load
    log.info("serving scenario: concurrency %s, %d in / %d out tokens, engine %s",
             ", ".join(map(str, load.concurrency)), load.input_len, load.output_len, engine)
    levels, method = run_sweep(model_dir, device, graph, load, engine=engine,
                               vllm_python=load.python if engine == "vllm" else None, tp=cfg.tp, pp=cfg.pp)
    return report.model_copy(update={"serving": levels, "serving_method": method})


def _measure_in_child(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, graph: bool) -> dict:
    cmd = [sys.executable, "-m", "npuflow.bench.measure", str(model_dir), device, dtype, cfg.model_dump_json()]
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
    check_load_tool(cfg)
    scenarios = cfg.resolved_scenarios
    log.info("benchmarking %d scenario(s) (%s): %d warm-up + >= %d runs and >= %g s each", len(scenarios),
             ", ".join(s.name for s in scenarios), cfg.warmup, cfg.iterations, cfg.min_seconds)
    if cfg.mode != "single":  # the mode being released only: the model may not fit one device
        from npuflow.bench.parallel import launch

        log.info("%s: tp = %d x pp = %d ranks", cfg.mode, cfg.tp, cfg.pp)
        results = [launch(model_dir, deployable.device, deployable.dtype, cfg)]
    else:
        results = [_measure_in_child(model_dir, deployable.device, deployable.dtype, cfg,
                                     deployable.runtime == Runtime.NPUFLOW_GRAPH)]
    report = build_report(results, model_dir, deployable.device, deployable.device_name, cfg,
                          quantized.size_bytes, uri=store.url(key), key=key,
                          deployable_manifest_sha256=deployable.manifest_sha256, label=deployable.name)
    report = with_serving_load(report, model_dir, deployable.device, cfg,
                               deployable.runtime == Runtime.NPUFLOW_GRAPH, engine=deployable.engine)
    m = report.metrics
    log.info("TTFT p50 %.2f ms, TPOT p50 %.2f ms (%.1f tok/s), MBU %s, peak memory %.0f MB", m["ttft_ms_p50"],
             m["tpot_ms_p50"], m["decode_tokens_per_s"],
             f"{m['mbu_pct']:.1f}%" if "mbu_pct" in m else "n/a", m["peak_memory_mb"])
    with staging_dir("benchmark") as tmp:
        files = render(report, Path(tmp), tpot_regression_pct=cfg.tpot_regression_pct)
        report = report.model_copy(update={"report_files": [p.name for p in files]})
        return publish(store, report, Path(tmp))
