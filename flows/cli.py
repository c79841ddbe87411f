"""The `npuflow` command: run the release flow, or one stage on its own."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from npuflow.errors import ConfigError, NpuflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="npuflow: release Llama-family models to Ascend NPU, CUDA and CPU.")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _emit(data: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in data.items():
        table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    Console(stderr=False).print(table)


def _logging(as_json: bool) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("alembic", "httpx", "urllib3", "botocore", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- the whole pipeline -----------------------------------------------------------------------


@app.command()
def run(config: Annotated[Path, typer.Argument(help="YAML run config, e.g. configs/tiny-llama-cpu.yaml")],
        as_json: JsonOpt = False) -> None:
    """Run the release flow (fetch -> quantize -> convert -> validate -> benchmark -> register -> promote)."""
    from npuflow.config import load_config

    cfg = load_config(config)  # bad config: exit 2 before anything is started or written
    from npuflow.backends import get_backend

    get_backend(cfg.convert.device)  # a missing device runtime: exit 2 before any work
    from flows.release import release

    result = release(cfg)
    if as_json:
        _emit(result.model_dump(), True, "")
        return
    from rich.console import Console
    from rich.table import Table

    stages = Table(title=f"release {result.name}: version {result.version} -> {result.decision}")
    stages.add_column("stage")
    stages.add_column("result")
    for stage, hit in result.cache_hits.items():
        stages.add_row(stage, "cache hit" if hit else ("registered" if stage == "register" else "ran"))
    metrics = Table(title="metrics (MLflow names)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in result.metrics.items():
        metrics.add_row(k, f"{v:.6g}")
    console = Console()
    console.print(stages, metrics)
    console.print("why: " + "; ".join(result.reasons))
    console.print(f"registry: {result.tracking_uri}   artifacts: {result.store_uri}")


# ---- stages on their own ----------------------------------------------------------------------


@app.command("make-tiny-model")
def make_tiny_model(output: Annotated[Path, typer.Argument(help="Directory to create (must not exist).")],
                    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
                    as_json: JsonOpt = False) -> None:
    """Build the demo model: a tiny Llama trained for seconds on a synthetic corpus (HF format)."""
    from npuflow.tinymodel import build_tiny_llama

    if output.exists():
        raise ConfigError(f"{output} already exists; choose a new directory")
    out = build_tiny_llama(output, steps=steps, progress=True)
    _emit({"path": str(out), "files": sorted(p.name for p in out.iterdir())}, as_json, "tiny model")


@app.command()
def fetch(source: Annotated[str, typer.Argument(help="file://DIR, s3://BUCKET/PREFIX or hf://ORG/NAME@REV")],
          name: Annotated[str, typer.Option(help="Model line name (store prefix).")],
          allow_pickle: Annotated[bool, typer.Option(help="Accept *.bin/*.pt checkpoints.")] = False,
          as_json: JsonOpt = False) -> None:
    """Fetch weights into the artifact store, verifying every sha256."""
    from npuflow.config import SourceConfig
    from npuflow.fetch import fetch as do_fetch
    from npuflow.settings import Settings
    from npuflow.store import open_store

    try:
        src = SourceConfig(uri=source, allow_pickle=allow_pickle)
    except ValueError as err:
        raise ConfigError(f"bad SOURCE: {err}") from None
    art = do_fetch(src, name, open_store(Settings().resolved_store_uri))
    _emit({**art.model_dump(exclude={"hf_config"}), "cache_hit": art.cache_hit}, as_json, "fetch")


@app.command()
def quantize(source: Annotated[str, typer.Argument(help="Model directory, or file://, s3://, hf://ORG/NAME@REV.")],
             output: Annotated[Path, typer.Option("--output", help="Directory to create.")],
             scheme: Annotated[str, typer.Option(help="w8a16 or w4a16.")] = "w8a16",
             group_size: Annotated[int | None, typer.Option(help="w4a16: 32, 64 or 128 (default 128).")] = None,
             method: Annotated[str, typer.Option(help="rtn or gptq (calibrated).")] = "rtn",
             fmt: Annotated[str, typer.Option("--format", help="native, msmodelslim or compressed-tensors.")] = "native",
             calibration: Annotated[str, typer.Option(help="Calibration text for gptq (file://, s3://, builtin:).")]
             = "builtin:tiny-corpus-train",
             ignore: Annotated[list[str] | None, typer.Option(help="Module patterns kept in float (repeatable).")] = None,
             as_json: JsonOpt = False) -> None:
    """Quantize a model shard by shard; OUTPUT appears only when complete."""
    import shutil
    import tempfile

    from npuflow.config import CalibrationConfig, QuantizationConfig, format_validation_error
    from npuflow.quantize import quantize_model

    try:
        cfg = QuantizationConfig(
            scheme=scheme, group_size=group_size, method=method, format=fmt,
            calibration=CalibrationConfig(text=calibration),
            **({"ignore": tuple(ignore)} if ignore is not None else {}),
        )
    except ValueError as err:
        detail = format_validation_error(err, QuantizationConfig) if hasattr(err, "errors") else str(err)
        raise ConfigError(f"bad option:\n{detail}") from None
    if output.exists():
        raise ConfigError(f"{output} already exists; choose a new directory")
    src = _source_dir(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
        qm = quantize_model(src, Path(tmp), cfg)
        shutil.move(tmp, output)
        Path(tmp).mkdir()  # so the context manager's cleanup finds its directory
    _emit({"output": str(output), "scheme": qm["scheme"], "method": qm["method"], "format": qm["format"],
           "group_size": qm["group_size"], "files": qm["files"]}, as_json, "quantize")


def _source_dir(source: str) -> Path:
    """A local directory for SOURCE: as is, or fetched (verified) into the store first."""
    if "://" not in source:
        path = Path(source)
        if not path.is_dir():
            raise ConfigError(f"{source} is not a directory (or use file://, s3://, hf:// as in `npuflow fetch`)")
        return path
    from npuflow.artifacts import materialize
    from npuflow.config import SourceConfig
    from npuflow.fetch import fetch as do_fetch
    from npuflow.settings import Settings
    from npuflow.store import open_store

    try:
        src = SourceConfig(uri=source)
    except ValueError as err:
        raise ConfigError(f"bad SOURCE: {err}") from None
    settings = Settings()
    store = open_store(settings.resolved_store_uri)
    name = source.rstrip("/").rsplit("/", 1)[-1].split("@")[0] or "model"
    art = do_fetch(src, name, store)
    return materialize(store, art.key, art.files, settings.cache_dir)


@app.command()
def convert(artifact: Annotated[Path, typer.Argument(help="Quantized model directory (quant_manifest.json).")],
            output: Annotated[Path | None, typer.Option("--output", help="Write the deployable here (new dir).")]
            = None,
            device: Annotated[str, typer.Option(help="cpu, cuda or npu.")] = "cpu",
            dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
            graph: Annotated[bool, typer.Option("--graph/--eager", help="Graph mode (torch.compile/torchair).")]
            = False,
            as_json: JsonOpt = False) -> None:
    """Load a quantized model on DEVICE, run the smoke forward pass, and write the deployable."""
    import shutil
    import tempfile

    from npuflow.backends import get_backend
    from npuflow.convert import smoke_test
    from npuflow.runtime import DTYPES, load_quantized, resolve_dtype

    backend = get_backend(device)  # fails before any work when the device is missing
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    if output is not None and output.exists():
        raise ConfigError(f"{output} already exists; choose a new directory")
    if not (artifact / "quant_manifest.json").is_file():
        raise ConfigError(f"{artifact} has no quant_manifest.json: pass the output of `npuflow quantize`")
    dt = resolve_dtype(dtype, backend)
    model = load_quantized(artifact, backend, dt, graph=graph)
    info = {"device": device, "device_name": backend.device_name(), "dtype": str(dt).removeprefix("torch."),
            "runtime": "npuflow-graph" if graph else "npuflow-eager", "kernels": backend.kernels(dt),
            "smoke_logits_sha256": smoke_test(model, model.config.vocab_size, backend.device()),
            "versions": backend.versions()}
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
            shutil.copytree(artifact, tmp, dirs_exist_ok=True)
            (Path(tmp) / "deployable.json").write_text(json.dumps(info, indent=2))
            shutil.move(tmp, output)
            Path(tmp).mkdir()
        info["output"] = str(output)
    _emit(info, as_json, "convert")


@app.command("export-onnx")
def export_onnx_cmd(
        artifact: Annotated[Path, typer.Argument(help="Quantized model directory (quant_manifest.json).")],
        output: Annotated[Path, typer.Option("--output", help="Directory to create (the offline model).")],
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence: the offline model's static T.")] = 128,
        batch_size: Annotated[int, typer.Option(help="Sequences per call: the static B.")] = 1,
        soc_version: Annotated[str, typer.Option(help="ATC target, as `npu-smi info` names it.")] = "Ascend910B2",
        as_json: JsonOpt = False) -> None:
    """Export the prefill forward to ONNX, check it with onnxruntime, compile it with ATC when on PATH."""
    from npuflow.offline import export_onnx

    result = export_onnx(artifact, output, seq_len=seq_len, batch_size=batch_size, soc_version=soc_version)
    _emit({"output": result.output, "onnx_file": result.onnx_file, "onnx_bytes": result.onnx_bytes,
           "opset": result.opset, "input_shapes": result.input_shapes, "max_abs_diff": result.check.max_abs_diff,
           "top1_agreement": result.check.top1_agreement, "export_seconds": result.export_seconds,
           "soc_version": result.soc_version, "atc": result.atc.status}, as_json, "export-onnx")


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
              mode: Annotated[str, typer.Option(help="single or tensor-parallel (torchrun).")] = "single",
              tp: Annotated[int, typer.Option("--tp", help="Ranks in tensor-parallel mode (torchrun).")] = 1,
              single_baseline: Annotated[bool, typer.Option(
                  help="Tensor-parallel: also measure one device, and compare greedy tokens.")] = True,
              report: Annotated[Path | None, typer.Option("--report", help="Write report.md/.html, plots.")]
              = None,
              json_file: Annotated[Path | None, typer.Option("--json", help="Write the results here.")]
              = None) -> None:
    """Time TTFT and TPOT per scenario on DEVICE (single: this process; tensor-parallel: torchrun ranks)."""
    import yaml

    from npuflow.backends import get_backend
    from npuflow.benchmark import RUNTIMES, benchmark_dir
    from npuflow.config import BenchmarkConfig, format_validation_error
    from npuflow.report import render, scenario_metrics
    from npuflow.runtime import DTYPES

    backend = get_backend(device)  # a missing device: exit 2 before any work
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown --runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    if dtype == "auto":
        dtype = "float32" if runtime == "hf-eager" else str(backend.default_dtype()).removeprefix("torch.")
    quantized = (model / "quant_manifest.json").is_file()
    if runtime == "npuflow" and not quantized:
        raise ConfigError(f"{model} is not a quantized model directory (no quant_manifest.json); "
                          "run `npuflow quantize`, or use --runtime hf-eager for an unquantized model")
    if runtime == "hf-eager" and (quantized or not (model / "config.json").is_file()):
        raise ConfigError(f"--runtime hf-eager runs plain transformers on the unquantized model: pass its "
                          f"directory (config.json + safetensors; the quantize source), not {model}")
    if runtime == "hf-eager" and mode != "single":
        raise ConfigError("--runtime hf-eager is the single-device baseline; use --mode single")
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
        cfg = BenchmarkConfig(**which, warmup=warmup, iterations=iterations, min_seconds=min_seconds, mode=mode,
                              tp=tp)
    except ValueError as err:
        detail = format_validation_error(err, BenchmarkConfig) if hasattr(err, "errors") else str(err)
        raise ConfigError(f"bad option:\n{detail}") from None
    rep = benchmark_dir(model, device, dtype, cfg, single_baseline=single_baseline, runtime=runtime, graph=graph)
    files = render(rep, report, tpot_regression_pct=cfg.tpot_regression_pct) if report else []
    greedy = rep.greedy_tokens
    data = {
        **rep.metrics, "energy": rep.energy, "mode": cfg.mode, "tp": cfg.tp, "device_name": rep.device_name,
        "runtime": rep.method["runtime"].get(cfg.mode, runtime), "dtype": dtype,
        "first_run_s": rep.method["first_run_s"],
        "greedy_tokens": greedy,
        "greedy_tokens_match": (greedy.get("tensor-parallel") == greedy.get("single")) if len(greedy) > 1
        else None,
        "metrics": rep.metrics | scenario_metrics(rep), "scenarios": [s.model_dump() for s in rep.scenarios],
        "roofline": rep.roofline, "report_files": [str(f) for f in files],
    }
    if json_file:
        json_file.write_text(json.dumps(data, indent=2))
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
    if data["greedy_tokens_match"] is not None:
        same = "identical" if data["greedy_tokens_match"] else "DIFFER"
        console.print(f"greedy tokens, tensor-parallel vs single: {same}")
    console.print(f"energy: {rep.energy}")
    if files:
        console.print(f"report: {files[1]}")


@app.command("report")
def report_cmd(run_id: Annotated[str, typer.Argument(help="MLflow run id of a pipeline run.")],
               output: Annotated[Path | None, typer.Option("--output", help="Directory (./report-RUNID).")]
               = None,
               as_json: JsonOpt = False) -> None:
    """Re-render a run's benchmark report (Markdown, HTML, plots) from MLflow, against the champion."""
    from npuflow import registry
    from npuflow.settings import Settings

    out = output or Path(f"report-{run_id[:8]}")
    c = registry.client(Settings().resolved_tracking_uri)
    files, gate = registry.render_run_report(c, run_id, out)
    _emit({"files": [str(f) for f in files], "regression_gate": gate.model_dump() if gate else None}, as_json,
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
    from npuflow.plan import cheapest
    from npuflow.plan import plan as make_plan

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
        _emit(data, True, "")
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


@app.command()
def models(name: Annotated[str, typer.Argument(help="Registered model name (the config's `name`).")],
           as_json: JsonOpt = False) -> None:
    """The registry's versions of NAME with their aliases and tags."""
    from npuflow import registry
    from npuflow.settings import Settings

    c = registry.client(Settings().resolved_tracking_uri)
    versions = c.search_model_versions(f"name='{name}'")
    if not versions:
        raise NpuflowError(f"no registered model {name!r} at {Settings().resolved_tracking_uri}")
    by_version: dict[str, list[str]] = {}
    for alias, v in registry.aliases(c, name).items():
        by_version.setdefault(v, []).append(alias)
    rows = {f"v{v.version}": {"aliases": sorted(by_version.get(str(v.version), [])), "gates": v.tags.get("gates"),
                               "rollout": v.tags.get("rollout"), "artifact": v.tags.get("artifact_sha256", "")[:12]}
            for v in sorted(versions, key=lambda v: int(v.version))}
    _emit(rows, as_json, f"registry: {name}")


# ---- serving and rollback ---------------------------------------------------------------------


@app.command()
def serve(config: Annotated[Path, typer.Option("--config", help="Run config (its `name` is served).")],
          port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
          host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
          challenger_weight: Annotated[float, typer.Option(
              help="Share of traffic for the challenger (the `candidate` alias when it is not the champion), "
                   "0-100; the champion gets the rest. Change it at run time: POST /admin/weights.")] = 0.0,
          token: Annotated[str | None, typer.Option(
              envvar="NPUFLOW_SERVE_TOKEN", show_envvar=True,
              help="Bearer token required on /v1 and /admin (default: none).")] = None,
          max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 256,
          ) -> None:
    """Serve the champion (and a challenger) from the registry: OpenAI /v1/completions, /health, /metrics."""
    from npuflow.config import load_config

    cfg = load_config(config)
    if not 0 <= challenger_weight <= 100:
        raise ConfigError(f"--challenger-weight must be 0..100 (% of traffic), got {challenger_weight:g}")
    from npuflow.serve import ModelPool, ServeOptions, run_server
    from npuflow.settings import Settings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a server's log, not a terminal
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        logging.getLogger("npuflow.serve").warning(
            "binding %s without a token: anyone who can reach it may change weights and reload "
            "(set NPUFLOW_SERVE_TOKEN)", host)
    settings = Settings()
    pool = ModelPool(ServeOptions(
        name=cfg.name, tracking_uri=settings.resolved_tracking_uri, store_uri=settings.resolved_store_uri,
        cache_dir=settings.cache_dir, champion_weight=100 - challenger_weight,
        challenger_weight=challenger_weight,
        token=token or None, max_tokens_limit=max_tokens,
    ))
    state = pool.reload()  # no champion, or one that fails to load: exit 1 before the socket opens
    chal = state["challenger"]
    logging.getLogger("npuflow.serve").info(
        "serving %s: champion v%s%s on http://%s:%d", cfg.name, state["champion"]["version"],
        f", challenger v{chal['version']} ({chal['status']}, weight {chal['weight']:g})" if chal else "",
        host, port)
    run_server(pool, host=host, port=port)


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Registered model name (the config's `name`).")],
             reason: Annotated[str, typer.Option(help="Why: recorded on both versions.")] = "manual rollback",
             actor: Annotated[str | None, typer.Option(help="Who (default: the login name).")] = None,
             server_url: Annotated[str | None, typer.Option(
                 help="A running `npuflow serve` to reload afterwards, e.g. http://127.0.0.1:8080.")] = None,
             token: Annotated[str | None, typer.Option(envvar="NPUFLOW_SERVE_TOKEN", show_envvar=True,
                                                       help="The server's bearer token.")] = None,
             as_json: JsonOpt = False) -> None:
    """Move `champion` back to `previous` and record who and why; reload a running server."""
    import getpass

    from npuflow import registry
    from npuflow.rollback import notify_server
    from npuflow.rollback import rollback as do_rollback
    from npuflow.settings import Settings

    try:
        who = actor or getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        who = "unknown"
    c = registry.client(Settings().resolved_tracking_uri)
    result = do_rollback(c, name, reason, who)
    data = result.model_dump()
    if server_url:
        state = notify_server(server_url, token, result.champion)
        data["server"] = {"url": server_url, "champion": state["champion"]["version"],
                          "challenger": (state.get("challenger") or {}).get("version")}
    if not as_json:
        print(result.message, file=sys.stderr)
    _emit(data, as_json, f"rollback {name}")


@app.command("rollout")
def rollout_cmd(
        config: Annotated[Path, typer.Option("--config", help="YAML run config (its `rollout:` section).")],
        server_url: Annotated[str | None, typer.Option(
            "--server-url", help="A running `npuflow serve` (default: start one in this process on 127.0.0.1).")
        ] = None,
        as_json: JsonOpt = False) -> None:
    """Roll the `candidate` out against the `champion` stage by stage; a failed stage rolls traffic back."""
    from npuflow.config import load_config

    cfg = load_config(config)
    from flows.rollout import rollout

    record = rollout(cfg, server_url=server_url)
    _emit(record.model_dump(exclude={"stages"}) | {"stages": [
        f"{s.name} {s.weight:g}%: {s.verdict.result}" for s in record.stages]}, as_json,
        f"rollout {record.name}: v{record.candidate_version} {record.decision}")


@app.command("deploy")
def deploy_cmd(
        config: Annotated[Path, typer.Option("--config", help="Run config YAML: the deployments' default "
                                             "parameters; its convert.device picks the work pool.")],
        cron: Annotated[str, typer.Option(help="nightly-check's schedule (minute hour day month weekday).")]
        = "0 2 * * *",
        timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule.")] = "UTC",
        api_url: Annotated[str | None, typer.Option(
            "--api-url", envvar="PREFECT_API_URL", show_envvar=True,
            help="Prefect server API, e.g. http://127.0.0.1:4200/api.")] = None,
        working_dir: Annotated[Path | None, typer.Option(
            help="Where workers run the flows (relative file:// URIs and .npuflow resolve there; default: here).")]
        = None,
        as_json: JsonOpt = False) -> None:
    """Register the `release` (on demand) and `nightly-check` (cron) deployments on a Prefect server."""
    from npuflow.config import load_config

    cfg = load_config(config)
    from flows.deploy import api_url_or_error, check_schedule, deploy

    check_schedule(cron, timezone)
    url = api_url_or_error(api_url)  # before the flows are imported: a missing server fails fast, exit 2
    deployed, created = deploy(cfg, url, cron=cron, timezone=timezone, working_dir=working_dir)
    if as_json:
        _emit({"api_url": url, "work_pools_created": created, "deployments": [d.model_dump() for d in deployed]},
              True, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"deployments on {url}")
    for col in ("deployment", "id", "work pool", "schedule"):
        table.add_column(col)
    for d in deployed:
        table.add_row(d.name, d.id, d.work_pool, d.schedule or "on demand")
    console = Console()
    console.print(table)
    console.print(f"work pools created: {', '.join(created) or 'none (all existed)'}; flows run in {deployed[0].working_dir}")
    console.print(f"start a worker: prefect worker start --pool {deployed[0].work_pool}   "
                  f"run now: prefect deployment run '{deployed[0].name}'")


def main() -> None:
    """Entry point: NpuflowError -> one clear message and its exit code (2 bad input, 1 failed stage)."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "npuflow")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    _logging("--json" in sys.argv)
    try:
        app(standalone_mode=False)
    except NpuflowError as err:
        print(f"npuflow: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (typer.Exit, SystemExit) as err:
        sys.exit(getattr(err, "exit_code", getattr(err, "code", 0)))
    except Exception as err:  # click usage errors; torch failing to import because of torch_npu
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        if "torch_npu" in str(err) or "libhccl" in str(err) or "libascend" in str(err):
            from npuflow.backends.npu import INSTALL_HINT

            print(f"npuflow: error: torch failed to import because torch_npu is installed but cannot load ({err}). "
                  "torch auto-loads torch_npu, so without CANN `import torch` itself fails: "
                  f"{INSTALL_HINT}, or uninstall torch_npu on machines without an NPU "
                  "(TORCH_DEVICE_BACKEND_AUTOLOAD=0 also stops the auto-load)", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
