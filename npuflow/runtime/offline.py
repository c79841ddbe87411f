"""Offline model for Ascend: the prefill forward exported to ONNX, checked with onnxruntime, compiled by ATC.

    export_onnx(artifact_dir, out_dir, seq_len=128) writes, published by one rename when complete:
        model.onnx             input_ids int64 (B, T) -> logits float32 (B, T, V); opset 18; no KV cache
        offline_manifest.json  sha256, opset, shapes, the onnxruntime check, soc_version, ATC's status
        atc_command.sh         the exact `atc` command (run by export_onnx when `atc` is on PATH)
        OFFLINE.md             what the files are and the next step
        model.om, atc.log      when ATC ran

Weights go into the graph dequantized to float32: ATC compiles float ONNX graphs (its default precision
mode, force_fp16, runs them in float16), whereas int8 * scale written as Cast/Mul nodes is either
folded back into float constants or re-executed on every call; an int8 weight-only offline model needs
Ascend's AMCT, not a different ONNX spelling. The online path (torch_npu's npu_weight_quant_batchmatmul)
keeps the integer weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from npuflow.core.engines import offline_problem
from npuflow.core.errors import ConfigError, NpuflowError

log = logging.getLogger("npuflow.offline")

ONNX_FILE = "model.onnx"
OM_STEM = "model"  # atc --output=model writes model.om
MANIFEST = "offline_manifest.json"
COMMAND_FILE = "atc_command.sh"
README = "OFFLINE.md"
ATC_LOG = "atc.log"
EXTERNAL_DATA_BYTES = 1536 << 20  # weights above this go to model.onnx.data (protobuf caps a file at 2 GiB)
OPSET = 18  # torch 2.13's exporter emits 18 natively; lower targets fail to convert (see _export)
DEFAULT_SOC = "Ascend910B2"
SOC_PATTERN = re.compile(r"Ascend[0-9A-Za-z_]+")  # Ascend910B2, Ascend310P3, Ascend910_9391 (A3)
CHECK_SEED = 0  # the onnxruntime check's random prompt
MAX_DIFF_REL = 1e-3  # max |onnx - torch| over all logits, as a fraction of max |torch logits| (both fp32)
TOP1_MIN = 0.99  # argmax agreement over all B*T positions
ATC_NOT_RUN = "not run: atc not on PATH"
OFFLINE_DEPS = ("onnx", "onnxruntime", "onnxscript")  # the `offline` extra
KV_CACHE = ("none: a prefill-only graph, every call recomputes all T positions; "
            "decode with a KV cache is not exported yet")


class OnnxCheck(BaseModel):
    """onnxruntime (CPU) against the npuflow runtime's logits on the same seeded random prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seed: int
    positions: int  # B * T logits rows compared
    max_abs_diff: float  # max |onnx - torch| over all (B, T, V) logits
    logits_abs_max: float  # max |torch logits|: the scale the tolerance is relative to
    tolerance: float  # MAX_DIFF_REL * max(1, logits_abs_max)
    top1_agreement: float  # fraction of positions whose argmax agrees
    top1_min: float


class AtcResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    status: str  # "ok", "failed: exit N ...", or ATC_NOT_RUN
    command: list[str]  # argv, run in the output directory
    returncode: int | None = None
    om_file: str | None = None  # model.om when status is ok
    om_sha256: str | None = None
    seconds: float | None = None


class OfflineResult(BaseModel):
    """What offline_manifest.json holds (plus `output`, the published directory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    output: str
    onnx_file: str
    onnx_sha256: str
    onnx_bytes: int  # model.onnx plus model.onnx.data (the weights, above EXTERNAL_DATA_BYTES)
    files: dict[str, str]  # every ONNX file (name -> sha256)
    opset: int
    input_shapes: dict[str, list[int]]  # {"input_ids": [B, T]} int64
    output_shapes: dict[str, list[int]]  # {"logits": [B, T, V]} float32
    weights: str
    kv_cache: str
    check: OnnxCheck
    soc_version: str
    atc: AtcResult
    export_seconds: float  # torch.onnx.export plus saving
    source: dict[str, str | int | None]  # the quantized artifact this came from
    versions: dict[str, str]


def atc_command(soc_version: str, batch_size: int, seq_len: int) -> list[str]:
    """ATC's argv, relative to the output directory: ONNX (framework 5) -> model.om for one static shape."""
    return ["atc", "--framework=5", f"--model={ONNX_FILE}", f"--output={OM_STEM}", f"--soc_version={soc_version}",
            "--input_format=ND", f"--input_shape=input_ids:{batch_size},{seq_len}"]


def command_script(argv: list[str]) -> str:
    """atc_command.sh: the exact command, runnable from anywhere on a host with CANN."""
    return ("#!/bin/sh\n"
            "# Compile model.onnx into the Ascend offline model model.om (needs CANN: source its set_env.sh first).\n"
            "set -e\n"
            'cd "$(dirname "$0")"\n'
            f"{shlex.join(argv)}\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_inputs(artifact_dir: Path, out_dir: Path, seq_len: int, batch_size: int, opset: int,
                  soc_version: str) -> dict:
    """Everything that can be refused before any work: bad input is a ConfigError and nothing is written."""
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; choose a new directory")
    manifest = artifact_dir / "quant_manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"{artifact_dir} is not a quantized artifact (no quant_manifest.json): "
                          "pass the output of `npuflow quantize`")
    try:
        qm = json.loads(manifest.read_text())
    except ValueError:
        qm = None
    if not isinstance(qm, dict) or "format" not in qm:  # `format`: what load_quantized dispatches on
        raise ConfigError(f"{manifest} is not a valid quant manifest (JSON with a `format`)")
    if (why := offline_problem(qm.get("scheme"))) is not None:
        raise ConfigError(f"{artifact_dir}: {why}")
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"--seq-len and --batch-size must be >= 1, got {seq_len} and {batch_size}")
    if opset < OPSET:
        raise ConfigError(
            f"opset {opset}: the lowest supported is {OPSET}. torch 2.13's exporter emits opset 18 and its "
            "down-conversion fails on ReduceMean; the legacy TorchScript exporter fails on aten::diff in "
            "transformers 5's masks. CANN 7.0's ONNX operator list covers opsets v9-v18."
        )
    if not SOC_PATTERN.fullmatch(soc_version):
        raise ConfigError(f"--soc-version {soc_version!r}: expected AscendNAME as `npu-smi info` reports it, "
                          f"e.g. {DEFAULT_SOC}, Ascend310P3")
    missing = [m for m in OFFLINE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the offline export needs {', '.join(missing)}: pip install 'npuflow[offline]'")
    return qm


def _float_model(model: nn.Module) -> None:
    """In place: each QuantLinear becomes nn.Linear and W8Embedding nn.Embedding with the dequantized weights
    (float32, exactly what the reference kernels compute with); attention becomes HF's eager softmax(QK^T)V,
    which exports to plain MatMul/Softmax with the causal mask folded into a constant."""
    from npuflow.formats import QuantizedWeight
    from npuflow.runtime.loader import QuantLinear, W8Embedding

    def replace(path: str, new: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            w = QuantizedWeight(module.qweight, module.scale, module.zero, module.bits, module.group_size)
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.weight = nn.Parameter(w.dequantize(), requires_grad=False)  # (out, in)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            replace(name, new)
        elif isinstance(module, W8Embedding):
            weight = module.weight.float() * module.weight_scale.float()[:, None]  # (vocab, dim)
            new = nn.Embedding(*weight.shape, padding_idx=module.padding_idx, _weight=weight, _freeze=True)
            replace(name, new)
    model.set_attn_implementation("eager")


class _Prefill(nn.Module):
    """input_ids (B, T) int64 -> logits (B, T, V) float32; no attention mask, no cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's passes log every rewrite at INFO, and its registry warns once per torchvision op."""
    levels = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
              "torch.onnx._internal.exporter._registration": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    try:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> int:
    """torch.onnx.export with the torch.export-based exporter (the default since torch 2.9; needs onnxscript).
    Weights go to `model.onnx.data` beside it above EXTERNAL_DATA_BYTES. Returns the opset written."""
    weight_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    with _quiet_exporter():
        program = torch.onnx.export(_Prefill(model).eval(), (example,), dynamo=True, opset_version=opset,
                                    input_names=["input_ids"], output_names=["logits"], verbose=False)
    written = program.model.opset_imports.get("", None)
    if written != opset:
        raise NpuflowError(f"the exporter wrote opset {written}, not the requested {opset}")
    program.save(path, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return written


def _check_onnx(path: Path, ids: torch.Tensor, ref: torch.Tensor) -> OnnxCheck:
    """Run the ONNX model with onnxruntime on the CPU; raise when it does not match the torch logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])  # (B, T, V)
    if got.shape != ref.shape:
        raise NpuflowError(f"ONNX logits have shape {tuple(got.shape)}, the torch model's {tuple(ref.shape)}")
    scale = ref.abs().max().item()
    check = OnnxCheck(
        seed=CHECK_SEED, positions=ref.shape[0] * ref.shape[1], max_abs_diff=(got - ref).abs().max().item(),
        logits_abs_max=scale, tolerance=MAX_DIFF_REL * max(1.0, scale),
        top1_agreement=(got.argmax(-1) == ref.argmax(-1)).float().mean().item(), top1_min=TOP1_MIN,
    )
    if not check.max_abs_diff <= check.tolerance or check.top1_agreement < TOP1_MIN:  # NaN fails too
        raise NpuflowError(
            f"the ONNX model does not match the torch model: max |diff| {check.max_abs_diff:.3g} "
            f"(tolerance {check.tolerance:.3g}), top-1 agreement {check.top1_agreement:.4f} (min {TOP1_MIN})"
        )
    return check


def _run_atc(argv: list[str], cwd: Path) -> AtcResult:
    """Run ATC in the output directory; its stdout and stderr go to atc.log."""
    t0 = time.perf_counter()
    with open(cwd / ATC_LOG, "wb") as logf:
        proc = subprocess.run(argv, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT, check=False)
    seconds = round(time.perf_counter() - t0, 3)
    om = cwd / f"{OM_STEM}.om"
    if proc.returncode != 0:
        status = f"failed: exit {proc.returncode} (see {ATC_LOG})"
    elif not om.is_file():
        status = f"failed: atc exited 0 but wrote no {om.name} (see {ATC_LOG})"
    else:
        return AtcResult(status="ok", command=argv, returncode=0, om_file=om.name, om_sha256=_sha256(om),
                         seconds=seconds)
    return AtcResult(status=status, command=argv, returncode=proc.returncode, seconds=seconds)


def _readme(r: OfflineResult) -> str:
    b, t = r.input_shapes["input_ids"]
    if r.atc.status == "ok":
        step = (f"ATC compiled it for {r.soc_version}: `{r.atc.om_file}` (log in `{ATC_LOG}`). Load it with "
                "AscendCL (`aclmdlLoadFromFile`) and feed int64 `input_ids` of exactly this shape.")
    elif r.atc.status == ATC_NOT_RUN:
        step = (f"`atc` was not on PATH here, so the model is not compiled yet. On a host with CANN (for "
                f"{r.soc_version}: the `Name` that `npu-smi info` prints, prefixed `Ascend`), source CANN's "
                "`set_env.sh` (e.g. `/usr/local/Ascend/ascend-toolkit/set_env.sh`) and run `./atc_command.sh`; "
                "it writes `model.om` next to `model.onnx`.")
    else:
        step = f"ATC ran and {r.atc.status}. Fix what `{ATC_LOG}` says, then run `./atc_command.sh` again."
    return f"""# Offline model (ONNX -> Ascend .om)

`{r.onnx_file}`: the prefill forward of the quantized artifact, `input_ids` int64 ({b}, {t}) -> `logits`
float32 ({b}, {t}, {r.output_shapes["logits"][2]}), ONNX opset {r.opset}, static shapes.

- Weights: {r.weights}.
- KV cache: {r.kv_cache}.
- Checked with onnxruntime on the CPU against the npuflow runtime on a seeded random prompt
  (seed {r.check.seed}, {r.check.positions} positions): max |diff| {r.check.max_abs_diff:.3g}
  (tolerance {r.check.tolerance:.3g}), top-1 agreement {r.check.top1_agreement:.4f}.

## Next step

{step}

```
{shlex.join(r.atc.command)}
```

ATC takes one static shape: export again with other `--seq-len` / `--batch-size` for other shapes.
ATC's default precision mode (`--precision_mode=force_fp16`, `--precision_mode_v2=fp16`) computes the float32
graph in float16; add `--precision_mode_v2=mixed_float16` or `origin` to the command to keep more in float32.
The opset is 18; CANN 7.0's ONNX operator list covers v9-v18, while some CANN 8 ATC pages name v11-v15 for
`--framework=5`: if ATC refuses an operator version, that is the reason.
"""


def export_onnx(artifact_dir: Path, out_dir: Path, *, seq_len: int, batch_size: int = 1, opset: int = OPSET,
                soc_version: str = DEFAULT_SOC) -> OfflineResult:
    """Export, check and (when `atc` is on PATH) compile; out_dir appears only when complete.

    A mismatch between onnxruntime and torch raises NpuflowError and publishes nothing. A failed ATC run is
    recorded (status, atc.log) in the published directory and then raised, so the checked ONNX model is kept.
    """
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    qm = _check_inputs(artifact_dir, out_dir, seq_len, batch_size, opset, soc_version)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(artifact_dir)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")

    from npuflow.runtime.backends import cpu
    from npuflow.runtime.loader import load_quantized

    model = load_quantized(artifact_dir, cpu, torch.float32)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(CHECK_SEED))
    with torch.inference_mode():
        ref = model(ids).logits.float()  # (B, T, V): the runtime as convert and validate load it
    _float_model(model)
    example = (torch.arange(batch_size * seq_len) * 7919 % vocab).reshape(batch_size, seq_len)  # not `ids`

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        t0 = time.perf_counter()
        written = _export(model, example, tmp / ONNX_FILE, opset)
        export_seconds = round(time.perf_counter() - t0, 3)
        del model
        check = _check_onnx(tmp / ONNX_FILE, ids, ref)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}  # model.onnx (+ model.onnx.data)
        argv = atc_command(soc_version, batch_size, seq_len)
        atc = _run_atc(argv, tmp) if shutil.which("atc") else AtcResult(status=ATC_NOT_RUN, command=argv)
        result = OfflineResult(
            output=str(out_dir), onnx_file=ONNX_FILE, onnx_sha256=files[ONNX_FILE],
            onnx_bytes=sum((tmp / f).stat().st_size for f in files), files=files, opset=written,
            input_shapes={"input_ids": [batch_size, seq_len]}, output_shapes={"logits": [batch_size, seq_len, vocab]},
            weights=f"float32, dequantized from the {qm.get('scheme', '?')} artifact (integer weights do not survive "
                    "into the offline model; ATC's precision mode decides the NPU dtype)",
            kv_cache=KV_CACHE, check=check, soc_version=soc_version, atc=atc, export_seconds=export_seconds,
            source={"artifact": str(artifact_dir.resolve()), "scheme": qm.get("scheme"), "format": qm["format"],
                    "group_size": qm.get("group_size"),
                    "quant_manifest_sha256": _sha256(artifact_dir / "quant_manifest.json")},
            versions=_versions(),
        )
        (tmp / COMMAND_FILE).write_text(command_script(argv))
        (tmp / COMMAND_FILE).chmod(0o755)
        (tmp / README).write_text(_readme(result))
        (tmp / MANIFEST).write_text(json.dumps(result.model_dump(exclude={"output"}), indent=2) + "\n")
        if out_dir.exists():
            raise ConfigError(f"{out_dir} appeared while exporting; the export is discarded")
        tmp.chmod(0o755)  # mkdtemp made it 0700
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("offline model %s: %s (%.2f MB), onnxruntime max |diff| %.3g, top-1 %.4f; atc: %s", out_dir,
             ONNX_FILE, result.onnx_bytes / 1e6, check.max_abs_diff, check.top1_agreement, atc.status)
    if atc.status.startswith("failed"):
        raise NpuflowError(f"atc {atc.status.removeprefix('failed: ')}; the checked ONNX model is in {out_dir}, "
                           f"its log in {out_dir / ATC_LOG}; rerun with {out_dir / COMMAND_FILE}")
    return result


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in ("transformers", *OFFLINE_DEPS, "npuflow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
