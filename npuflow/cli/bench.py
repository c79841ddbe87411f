"""Commands that measure: benchmark (TTFT/TPOT per scenario), report (re-render from MLflow), plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from npuflow.cli.common import JsonOpt, app, emit
from npuflow.core.errors import ConfigError


@app.command()
def benchmark(model: Annotated[Path, typer.Argument(
                  help="npuflow: a quantized (or converted) model directory; hf-eager: an unquantized HF one.")],
              device: Annotated[str, typer.Option(help="cpu, cuda or npu.")] = "cpu",
              runtime: Annotated[str, typer.Option(
                  help="npuflow (quantized, the backend's kernels, static KV cache, compiled decode with "
                       "--graph) or hf-eager (plain transformers on the unquantized model, fp32).")] = "npuflow",
              graph: Annotated[bool, typer.Option(
                  "--graph/--eager", help="npuflow: compile the decode step (torch.compile / torchair).")] = True,
              dtype: Annotated[str, typer.Option(
                  help="auto (npuflow: the backend's default; hf-eager: float32), float32, bfloat16, float16.")]
              = "auto",
              batch_size: Annotated[int, typer.Option(help="Sequences per batch (without --scenarios).")] = 1,
              input_len: Annotated[int, typer.Option(help="Prompt tokens (without --scenarios).")] = 128,
              output_len: Annotated[int, typer.Option(help="Generated tokens, fixed (no --scenarios).")] = 32,
              scenarios: Annotated[Path | None, typer.Option(
                  help="YAML list of {batch_size, input_len, output_len}; the first is the primary.")] = None,
              warmup: Annotated[int, typer.Option(help="Untimed runs first, per scenario.")] = 2,
              iterations: Annotated[int, typer.Option(help="Timed runs at least, per scenario.")] = 5,
              min_seconds: Annotated[float, typer.Option(help="And at least this long, per scenario.")] = 0.0,
              mode: Annotated[str, typer.Option(help="single, tensor-parallel or pipeline-parallel (torchrun).")]
              = "single",
              tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel ranks per stage (torchrun).")] = 1,
              pp: Annotated[int, typer.Option("--pp", help="Pipeline stages (mode pipeline-parallel).")] = 1,
              single_baseline: Annotated[bool, typer.Option(
                  help="Tensor-parallel: also measure one device, and compare greedy tokens.")] = True,
              report: Annotated[Path | None, typer.Option("--report", help="Write report.md/.html, plots.")]
              = None,
              output: Annotated[Path | None, typer.Option("--output", help="Write the results (JSON) here.")]
              = None,
              serve_concurrency: Annotated[str | None, typer.Option(
                  help="Also serve the model (`npuflow serve --model`) and load it with vllm bench serve at "
                       "these concurrency levels, e.g. 1,4,16 (--input-len/--output-len per request; needs "
                       "`make vllm`).")] = None,
              as_json: JsonOpt = False) -> None:
    """Time TTFT and TPOT per scenario on DEVICE (single: this process; tensor-/pipeline-parallel: torchrun ranks)."""
    from npuflow.bench.report import render
    from npuflow.bench.stage import benchmark_dir

    dtype = _check_runtime(model, device, runtime, dtype, mode)
    load = None
    if serve_concurrency is not None:
        try:
            load = {"concurrency": [int(c) for c in serve_concurrency.split(",")], "input_len": input_len,
                    "output_len": output_len}
        except ValueError:
            raise ConfigError(f"--serve-concurrency {serve_concurrency!r}: expected integers separated by "
                              "commas, e.g. 1,4,16") from None
    cfg = _bench_config(scenarios, batch_size, input_len, output_len, warmup=warmup, iterations=iterations,
                        min_seconds=min_seconds, mode=mode, tp=tp, pp=pp, serving_load=load)
    rep = benchmark_dir(model, device, dtype, cfg, single_baseline=single_baseline, runtime=runtime, graph=graph)
    files = render(rep, report, tpot_regression_pct=cfg.tpot_regression_pct) if report else []
    data = _bench_data(rep, cfg, runtime, dtype, files)
    if output:
        output.write_text(json.dumps(data, indent=2))
    if as_json:
        emit(data, True, "")
        return
    _print_bench(model, rep, data, files)


def _check_runtime(model: Path, device: str, runtime: str, dtype: str, mode: str) -> str:
    """Refuse a runtime/model/dtype combination that cannot run (before any work); the dtype to use."""
    from npuflow.bench.measure import RUNTIMES
    from npuflow.core.names import Runtime
    from npuflow.runtime.backends import get_backend
    from npuflow.runtime.loader import DTYPES

    backend = get_backend(device)  # a missing device: exit 2 before any work
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown --runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = "float32" if runtime == Runtime.HF_EAGER else str(backend.default_dtype()).removeprefix("torch.")
    quantized = (model / "quant_manifest.json").is_file()
    if runtime == Runtime.NPUFLOW and not quantized:
        raise ConfigError(f"{model} is not a quantized model directory (no quant_manifest.json); "
                          "run `npuflow quantize`, or use --runtime hf-eager for an unquantized model")
    if runtime == Runtime.HF_EAGER and (quantized or not (model / "config.json").is_file()):
        raise ConfigError(f"--runtime hf-eager runs plain transformers on the unquantized model: pass its "
                          f"directory (config.json + safetensors; the quantize source), not {model}")
    if runtime == Runtime.HF_EAGER and mode != "single":
        raise ConfigError("--runtime hf-eager is the single-device baseline; use --mode single")
    return dtype


def _bench_config(scenarios: Path | None, batch_size: int, input_len: int, output_len: int, **rest):
    """The BenchmarkConfig the options describe (a --scenarios YAML list, or one scenario)."""
    import yaml

    from npuflow.core.config import BenchmarkConfig, format_validation_error

    listed = None
    if scenarios is not None:
        try:
            listed = yaml.safe_load(scenarios.read_bytes())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--scenarios {scenarios}: {err}") from None
        if not isinstance(listed, list) or not listed:
            raise ConfigError(f"--scenarios {scenarios}: expected a YAML list of "
                              "{batch_size, input_len, output_len}")
    try:
        which = {"scenarios": listed} if listed else {"batch_size": batch_size, "input_len": input_len,
                                                       "output_len": output_len}
        return BenchmarkConfig(**which, **rest)
    except ValueError as err:
        detail = format_validation_error(err, BenchmarkConfig) if hasattr(err, "errors") else str(err)
        raise ConfigError(f"bad option:\n{detail}") from None


def _bench_data(rep, cfg, runtime: str, dtype: str, files: list[Path]) -> dict:
    from npuflow.bench.report import scenario_metrics

    greedy = rep.greedy_tokens
    return {
        **rep.metrics, "energy": rep.energy, "mode": cfg.mode, "tp": cfg.tp, "pp": cfg.pp,
        "device_name": rep.device_name,
        "runtime": rep.method["runtime"].get(cfg.mode, runtime), "dtype": dtype,
        "first_run_s": rep.method["first_run_s"],
        "greedy_tokens": greedy,
        "greedy_tokens_match": (greedy.get(cfg.mode) == greedy.get("single")) if len(greedy) > 1 else None,
        "metrics": rep.metrics | scenario_metrics(rep), "scenarios": [s.model_dump() for s in rep.scenarios],
        "roofline": rep.roofline, "report_files": [str(f) for f in files],
        "serving": rep.serving, "serving_method": rep.serving_method,
    }


def _print_bench(model: Path, rep, data: dict, files: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"benchmark {model.name} on {rep.device_name}")
    for col in ("scenario", "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "stdev %", "decode tok/s", "MBU %",
                ""):
        table.add_column(col)
    for s in rep.scenarios:
        mbu = s.roofline.mbu_pct if s.roofline else None
        label = f"{s.mode if s.mode == 'single' else f'TP={s.devices}'} {s.name}"
        table.add_row(label, f"{s.ttft_ms['p50']:.3f}", f"{s.tpot_ms['p50']:.3f}", f"{s.tpot_ms['p99']:.3f}",
                      f"{s.tpot_ms['stdev_pct']:.1f}",
                      f"{s.decode_tokens_per_s:.1f}", "n/a" if mbu is None else f"{mbu:.2f}",
                      "unstable" if s.unstable else "")
    console = Console()
    console.print(table)
    if rep.serving:
        served = Table(title=f"served: {rep.serving_method.get('server', 'npuflow serve')}")
        for col in ("concurrency", "output tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                    "ITL p50 ms", "ITL p99 ms", "failed"):
            served.add_column(col)
        for lv in rep.serving:
            served.add_row(str(lv["concurrency"]), f"{lv['output_tokens_per_s']:.1f}", f"{lv['requests_per_s']:.2f}",
                           f"{lv['ttft_ms']['p50']:.1f}", f"{lv['ttft_ms']['p99']:.1f}", f"{lv['tpot_ms']['p50']:.2f}",
                           f"{lv['itl_ms']['p50']:.2f}", f"{lv['itl_ms']['p99']:.2f}", str(lv["failed"]))
        console.print(served)
    if data["greedy_tokens_match"] is not None:
        same = "identical" if data["greedy_tokens_match"] else "DIFFER"
        console.print(f"greedy tokens, {data['mode']} vs single: {same}")
    console.print(f"energy: {rep.energy}")
    if files:
        console.print(f"report: {files[1]}")


@app.command("report")
def report_cmd(run_id: Annotated[str, typer.Argument(help="MLflow run id of a pipeline run.")],
               output: Annotated[Path | None, typer.Option("--output", help="Directory (./report-RUNID).")]
               = None,
               as_json: JsonOpt = False) -> None:
    """Re-render a run's benchmark report (Markdown, HTML, plots) from MLflow, against the champion."""
    from npuflow.core.settings import Settings
    from npuflow.registry import client as registry

    out = output or Path(f"report-{run_id[:8]}")
    c = registry.client(Settings().resolved_tracking_uri)
    files, gate = registry.render_run_report(c, run_id, out)
    emit({"files": [str(f) for f in files], "regression_gate": gate.model_dump() if gate else None}, as_json,
          f"report {run_id}")


@app.command()
def plan(model: Annotated[str, typer.Option(help="llama-2-7b, llama-2-13b, llama-2-70b or an HF config.json path.")],
         device: Annotated[str, typer.Option(help="ascend-910b1..b4, a100-80g, h100-sxm, h200 or cpu.")],
         precision: Annotated[str, typer.Option(help="fp16, w8a16 or w4a16.")] = "fp16",
         context: Annotated[int, typer.Option(help="Tokens per sequence (prompt + output).")] = 4096,
         batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 1,
         devices: Annotated[int | None, typer.Option("--tp", help="Devices for the parallel modes.")] = None,
         mbu: Annotated[str | None, typer.Option(help="Measured bandwidth utilisation range LO,HI (e.g. 0.55,0.7).")] = None,
         tpot_target: Annotated[float | None, typer.Option(help="TPOT target, ms: also find the cheapest setup.")] = None,
         as_json: JsonOpt = False) -> None:
    """Capacity plan: weight and KV memory, minimum devices, max batch, TPOT bounds per deployment mode."""
    from npuflow.bench.plan import cheapest
    from npuflow.bench.plan import plan as make_plan

    if precision not in ("fp16", "w8a16", "w4a16"):
        raise ConfigError(f"unknown precision {precision!r}; valid: fp16, w8a16, w4a16")
    eff = None
    if mbu:
        try:
            lo, hi = (float(x) for x in mbu.split(","))
        except ValueError:
            raise ConfigError(f"--mbu takes LO,HI fractions such as 0.55,0.7, not {mbu!r}") from None
        if not 0 < lo <= hi <= 1:
            raise ConfigError("--mbu fractions must satisfy 0 < LO <= HI <= 1")
        eff = (lo, hi)
    p = make_plan(model, device, precision, context, batch, devices=devices, mbu=eff)  # type: ignore[arg-type]
    data = p.model_dump()
    if tpot_target is not None:
        data["cheapest"] = cheapest(model, device, tpot_target, context, batch, mbu=eff)
    if as_json:
        emit(data, True, "")
        return
    from rich.console import Console
    from rich.table import Table

    head = Table(title=f"{p.model} on {p.device}, {p.precision}, context {p.context}, batch {p.batch}", show_header=False)
    for k in ("params_b", "weights_gb", "kv_cache_bytes_per_token", "kv_cache_gb_per_sequence", "min_devices",
              "max_batch_at_context", "prefill_ms_bound"):
        head.add_row(k, f"{data[k]:.4g}" if isinstance(data[k], float) else str(data[k]))
    modes = Table(title=f"decode TPOT per mode (expected at MBU {p.mbu_range[0]:.0%}-{p.mbu_range[1]:.0%})")
    for col in ("mode", "devices", "fits", "bound ms", "expected ms", "comm ms", "max batch"):
        modes.add_column(col)
    for name, mp in p.modes.items():
        modes.add_row(name, str(mp.devices), "yes" if mp.fits else "NO", f"{mp.tpot_ms_bound:.2f}",
                      f"{mp.tpot_ms_expected[0]:.1f}-{mp.tpot_ms_expected[1]:.1f}", f"{mp.comm_ms:.2f}",
                      str(mp.max_batch_at_context))
    console = Console()
    console.print(head, modes)
    if tpot_target is not None:
        console.print(f"cheapest meeting {tpot_target} ms: {data['cheapest'] or 'none within 16 devices'}")
    console.print(f"device figures: {p.device_source}")
