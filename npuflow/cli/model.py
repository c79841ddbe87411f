"""Commands that run one stage on its own: make-tiny-model, fetch, quantize, convert, export-onnx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from npuflow.cli.common import JsonOpt, app, emit
from npuflow.core.errors import ConfigError
from npuflow.core.names import runtime_label


@app.command("make-tiny-model")
def make_tiny_model(output: Annotated[Path, typer.Argument(help="Directory to create (must not exist).")],
                    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
                    as_json: JsonOpt = False) -> None:
    """Build the demo model: a tiny Llama trained for seconds on a synthetic corpus (HF format)."""
    from npuflow.demo.tinymodel import build_tiny_llama

    if output.exists():
        raise ConfigError(f"{output} already exists; choose a new directory")
    out = build_tiny_llama(output, steps=steps, progress=True)
    emit({"path": str(out), "files": sorted(p.name for p in out.iterdir())}, as_json, "tiny model")


@app.command()
def fetch(source: Annotated[str, typer.Argument(help="file://DIR, s3://BUCKET/PREFIX or hf://ORG/NAME@REV")],
          name: Annotated[str, typer.Option(help="Model line name (store prefix).")],
          allow_pickle: Annotated[bool, typer.Option(help="Accept *.bin/*.pt checkpoints.")] = False,
          as_json: JsonOpt = False) -> None:
    """Fetch weights into the artifact store, verifying every sha256."""
    from npuflow.core.config import SourceConfig
    from npuflow.core.settings import Settings
    from npuflow.core.store import open_store
    from npuflow.stages.fetch import fetch as do_fetch

    try:
        src = SourceConfig(uri=source, allow_pickle=allow_pickle)
    except ValueError as err:
        raise ConfigError(f"bad SOURCE: {err}") from None
    art = do_fetch(src, name, open_store(Settings().resolved_store_uri))
    emit({**art.model_dump(exclude={"hf_config"}), "cache_hit": art.cache_hit}, as_json, "fetch")


@app.command()
def quantize(source: Annotated[str, typer.Argument(help="Model directory, or file://, s3://, hf://ORG/NAME@REV.")],
             output: Annotated[Path, typer.Option("--output", help="Directory to create.")],
             scheme: Annotated[str, typer.Option(help="w8a16, w4a16, w8a8 or w8a8-dynamic.")] = "w8a16",
             group_size: Annotated[int | None, typer.Option(help="w4a16: 32, 64 or 128 (default 128).")] = None,
             method: Annotated[str, typer.Option(help="rtn or gptq (calibrated).")] = "rtn",
             fmt: Annotated[str, typer.Option("--format", help="native, msmodelslim or compressed-tensors.")] = "native",
             calibration: Annotated[str | None, typer.Option(
                 help="Calibration text for gptq and --sensitivity (file://, s3://; .jsonl: the \"text\" fields); "
                      "builtin:tiny-corpus-train (the default) is accepted for the demo model only.")] = None,
             sensitivity: Annotated[bool, typer.Option(
                 help="Also write sensitivity.json (each linear's output error on the calibration text).")] = False,
             ignore: Annotated[list[str] | None, typer.Option(help="Module patterns kept in float (repeatable).")] = None,
             as_json: JsonOpt = False) -> None:
    """Quantize a model shard by shard; OUTPUT appears only when complete."""
    import shutil
    import tempfile

    from npuflow.core.config import CalibrationConfig, QuantizationConfig, format_validation_error
    from npuflow.quant.model import quantize_model

    try:
        cfg = QuantizationConfig(
            scheme=scheme, group_size=group_size, method=method, format=fmt,
            calibration=CalibrationConfig(**({"text": calibration} if calibration else {})), sensitivity=sensitivity,
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
    emit({"output": str(output), "scheme": qm["scheme"], "method": qm["method"], "format": qm["format"],
           "group_size": qm["group_size"], "files": qm["files"]}, as_json, "quantize")


def _source_dir(source: str) -> Path:
    """A local directory for SOURCE: read in place (file:// checked against its SHA256SUMS when it ships one),
    or fetched (verified) into the store first (s3://, hf://).

    A local checkpoint is not copied into the store: that doubled the disk and I/O of the command (a 2 GB
    checkpoint: two copies and three hash passes before the first shard was read; 280 GB for 70B).
    `npuflow run` still fetches every source into the store, content-addressed.
    """
    if "://" not in source or source.startswith("file://"):
        from npuflow.core.store import file_uri_path

        path = file_uri_path(source) if "://" in source else Path(source)
        if not path.is_dir():
            raise ConfigError(f"{source} is not a directory (or use file://, s3://, hf:// as in `npuflow fetch`)")
        _check_sums(path, source)
        return path
    from npuflow.core.artifacts import materialize
    from npuflow.core.config import SourceConfig
    from npuflow.core.settings import Settings
    from npuflow.core.store import open_store
    from npuflow.stages.fetch import fetch as do_fetch

    try:
        src = SourceConfig(uri=source)
    except ValueError as err:
        raise ConfigError(f"bad SOURCE: {err}") from None
    settings = Settings()
    store = open_store(settings.resolved_store_uri)
    name = source.rstrip("/").rsplit("/", 1)[-1].split("@")[0] or "model"
    art = do_fetch(src, name, store)
    return materialize(store, art.key, art.files, settings.cache_dir)


def _check_sums(path: Path, source: str) -> None:
    """Every file a SHA256SUMS in path lists must match it (`sha256sum -c`); without one nothing is checked."""
    from npuflow.core.artifacts import sha256_file
    from npuflow.core.errors import IntegrityError
    from npuflow.core.paths import confined

    sums = path / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        expected, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        f = confined(path, name, source=str(sums))
        if not f.is_file() or sha256_file(f) != expected.lower():
            raise IntegrityError(f"{name} in {source} {'does not match' if f.is_file() else 'is missing, listed in'} "
                                 "its SHA256SUMS: the copy is corrupt or incomplete; re-copy the checkpoint")


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

    from npuflow.runtime.backends import get_backend
    from npuflow.runtime.loader import DTYPES, load_quantized, resolve_dtype
    from npuflow.stages.convert import smoke_test

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
            "runtime": runtime_label(graph), "kernels": backend.kernels(dt),
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
    emit(info, as_json, "convert")


@app.command("export-onnx")
def export_onnx_cmd(
        artifact: Annotated[Path, typer.Argument(help="Quantized model directory (quant_manifest.json).")],
        output: Annotated[Path, typer.Option("--output", help="Directory to create (the offline model).")],
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence: the offline model's static T.")] = 128,
        batch_size: Annotated[int, typer.Option(help="Sequences per call: the static B.")] = 1,
        soc_version: Annotated[str, typer.Option(help="ATC target, as `npu-smi info` names it.")] = "Ascend910B2",
        as_json: JsonOpt = False) -> None:
    """Export the prefill forward to ONNX, check it with onnxruntime, compile it with ATC when on PATH."""
    from npuflow.runtime.offline import export_onnx

    result = export_onnx(artifact, output, seq_len=seq_len, batch_size=batch_size, soc_version=soc_version)
    emit({"output": result.output, "onnx_file": result.onnx_file, "onnx_bytes": result.onnx_bytes,
           "opset": result.opset, "input_shapes": result.input_shapes, "max_abs_diff": result.check.max_abs_diff,
           "top1_agreement": result.check.top1_agreement, "export_seconds": result.export_seconds,
           "soc_version": result.soc_version, "atc": result.atc.status}, as_json, "export-onnx")
