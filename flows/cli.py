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


@app.command()
def benchmark(model: Annotated[Path, typer.Argument(help="Quantized model directory.")],
              device: Annotated[str, typer.Option(help="cpu, cuda or npu.")] = "cpu",
              dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
              batch_size: Annotated[int, typer.Option()] = 1,
              input_len: Annotated[int, typer.Option()] = 128,
              output_len: Annotated[int, typer.Option()] = 32,
              iterations: Annotated[int, typer.Option()] = 5,
              json_file: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None) -> None:
    """Time TTFT and TPOT of a quantized model on DEVICE in this process."""
    from npuflow.benchmark import measure
    from npuflow.config import BenchmarkConfig

    try:
        cfg = BenchmarkConfig(batch_size=batch_size, input_len=input_len, output_len=output_len, iterations=iterations)
    except ValueError as err:
        raise ConfigError(f"bad option: {err}") from None
    result = measure(model, device, dtype, cfg)
    s = result["scenario"]
    flat = {"ttft_ms_p50": s["ttft_ms"]["p50"], "ttft_ms_p90": s["ttft_ms"]["p90"], "tpot_ms_p50": s["tpot_ms"]["p50"],
            "tpot_ms_p90": s["tpot_ms"]["p90"], "decode_tokens_per_s": s["decode_tokens_per_s"],
            "throughput_tokens_per_s": s["throughput_tokens_per_s"], "peak_memory_mb": result["peak_memory_mb"],
            "energy": result["energy_note"], **result}
    if json_file:
        json_file.write_text(json.dumps(flat, indent=2))
    _emit({k: v for k, v in flat.items() if k != "scenario"}, False, f"benchmark {s['name']}")


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
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
