"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) for W8A8: calibrated smoothing and activation ranges, one
decoder layer in memory at a time (the layer-at-a-time structure of gptq.py).

Per decoder layer, on the calibration activations:
  1. max|X| per input channel of the two inputs that follow an RMSNorm: input_layernorm -> q/k/v_proj and
     post_attention_layernorm -> gate/up_proj. One smoothing vector per fused group (the group reads one
     input), s = max|X|^a / max|W|^(1-a) (in,), max|W| over the group's rows; the norm weight becomes
     g / s and every weight of the group W * s[None, :], so the float layer computes exactly what it did.
  2. The smoothed weights rounded to int8 per output channel (the weight the runtime will see).
  3. The layer run again on its smoothed, weight-quantized form: min/max of every quantized linear's input
     gives its static scale and offset (w8a8); those outputs feed layer i + 1.
What is not smoothed (msModelSlim's default anti-outlier pairs an RMSNorm with the linears it feeds, and
only those): o_proj (its input is the attention output, no norm before it) is quantized W8A8 unsmoothed;
down_proj is kept float by default (msModelSlim's Llama W8A8 recipes disable it: its input, the SiLU
product, has the widest outliers), see DEFAULT_FLOAT. Layers kept float never get activation parameters.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from npuflow.formats import QuantizedWeight
from npuflow.quant.checkpoint import is_target
from npuflow.quant.gptq import _prepare  # the checkpoint reader, embedded windows and layer runner GPTQ uses
from npuflow.quant.primitives import activation_params_static
from npuflow.quant.schemes import W8A8

log = logging.getLogger("npuflow.smoothquant")

RESULT_INDEX = "smoothquant.json"  # in workdir: which file holds each tensor, run parameters
DEFAULT_FLOAT = ("mlp.down_proj",)  # per decoder layer: kept float by default in the w8a8 schemes
# (norm that precedes the group, the linears that read its output): the foldable pairs
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
# linears that read one input, in forward order (the first module is hooked): one activation range each
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def default_float_layers(num_layers: int) -> frozenset[str]:
    """Module names the w8a8 schemes keep float unless asked otherwise (DEFAULT_FLOAT in every layer)."""
    return frozenset(f"model.layers.{i}.{m}" for i in range(num_layers) for m in DEFAULT_FLOAT)


def smoothing_factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^a / max|W|^(1-a) per input channel (in,) float32; 1 where a channel never fires or has
    no weight (nothing to migrate)."""
    x, w = x_max.float(), w_max.float()
    s = x.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x > 0) & (w > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def _stats(layers, layer: nn.Module, readers: list[str], x: torch.Tensor, keep: bool) -> dict[str, dict]:
    """Run the layer over x (S, T, d); per reader its input's max|X| per channel (in,) and global min, max."""
    out: dict[str, dict] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            inp = args[0].reshape(-1, args[0].shape[-1])  # (B*T, in)
            amax = inp.abs().amax(dim=0)
            lo, hi = float(inp.min()), float(inp.max())
            if name in out:
                o = out[name]
                o["amax"], o["lo"], o["hi"] = torch.maximum(o["amax"], amax), min(o["lo"], lo), max(o["hi"], hi)
            else:
                out[name] = {"amax": amax, "lo": lo, "hi": hi}
        return record

    handles = [layer.get_submodule(r).register_forward_pre_hook(hook(r)) for r in readers]
    try:
        layers.run(layer, x, keep=keep)
    finally:
        for h in handles:
            h.remove()
    return out


def _smooth(layer: nn.Module, prefix: str, stats: dict[str, dict], alpha: float, targets: set[str],
            norm_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fold s into each norm -> group pair that has a quantized linear; the new norm weights by tensor name."""
    norms: dict[str, torch.Tensor] = {}
    for norm_name, members in SMOOTH_GROUPS:
        if not any(m in targets for m in members):
            continue
        linears = [layer.get_submodule(m) for m in members]
        w_max = torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in linears]).amax(dim=0)  # (in,)
        s = smoothing_factors(stats[members[0]]["amax"], w_max, alpha)
        norm = layer.get_submodule(norm_name)
        g = norm.weight.detach()
        new_g = (g / s).to(norm_dtype)  # stored in the checkpoint's dtype: use the s that rounding gives
        s = torch.where(new_g != 0, g / new_g.float(), s)
        norm.weight.data = new_g.float()
        for lin in linears:
            lin.weight.data = lin.weight.detach() * s[None, :]
        norms[f"{prefix}{norm_name}.weight"] = new_g.cpu()
    return norms


def _save(path: Path, quantized: dict[str, QuantizedWeight], norms: dict[str, torch.Tensor]) -> None:
    tensors = dict(norms)
    for name, qw in quantized.items():
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = qw.qweight.cpu(), qw.scale.cpu().contiguous()
        if qw.act_scale is not None:
            tensors[f"{name}.act_scale"], tensors[f"{name}.act_offset"] = qw.act_scale, qw.act_offset
    save_file(tensors, path)


class SmoothQuantResult(Mapping[str, "QuantizedWeight | torch.Tensor"]):
    """Tensor name -> the W8A8 QuantizedWeight of a linear or the smoothed float weight of a norm, read on
    access from the per-layer files in workdir (quantize_dir's `precomputed`). Reopen with the workdir."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        meta = json.loads((self.workdir / RESULT_INDEX).read_text())
        self.files: dict[str, str] = meta.pop("files")
        self.act: str = meta["act"]
        self.info: dict = meta

    def __getitem__(self, name: str) -> QuantizedWeight | torch.Tensor:
        file = self.files[name]
        with safe_open(self.workdir / file, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)  # a smoothed norm weight
            static = self.act == "tensor"
            return QuantizedWeight(
                f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.scale"), None, 8, None, act=self.act,
                act_scale=f.get_tensor(f"{name}.act_scale") if static else None,
                act_offset=f.get_tensor(f"{name}.act_offset") if static else None)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _layer(i: int, layer: nn.Module, layers, x: torch.Tensor, handler: W8A8, ignore: tuple[str, ...],
           alpha: float | None) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """Smooth, quantize and calibrate decoder layer i in place; x becomes its output."""
    prefix = f"model.layers.{i}."
    norm_dtype = layer.input_layernorm.weight.dtype
    layer.to(x.device, torch.float32)
    targets = {m for grp in INPUT_GROUPS for m in grp if is_target(f"{prefix}{m}.weight", ignore)}
    readers = [grp[0] for grp in INPUT_GROUPS if any(m in targets for m in grp)]
    norms: dict[str, torch.Tensor] = {}
    if alpha is not None and targets:
        smooth_readers = [members[0] for _, members in SMOOTH_GROUPS]
        norms = _smooth(layer, prefix, _stats(layers, layer, smooth_readers, x, keep=False), alpha, targets,
                        norm_dtype)
    quantized: dict[str, QuantizedWeight] = {}
    for m in sorted(targets):
        lin = layer.get_submodule(m)
        quantized[f"{prefix}{m}.weight"] = qw = handler.quantize(lin.weight.detach())
        lin.weight.data = qw.dequantize().to(x.device)  # what later linears and layers see
    ranges = _stats(layers, layer, readers, x, keep=True)  # outputs of the quantized layer feed layer i + 1
    if not handler.dynamic:
        for grp in INPUT_GROUPS:
            for m in grp:
                if m in targets:  # a group reads one input: one scale and offset for all of it
                    scale, offset = activation_params_static(ranges[grp[0]]["lo"], ranges[grp[0]]["hi"])
                    qw = quantized[f"{prefix}{m}.weight"]
                    qw.act_scale, qw.act_offset = scale, offset
    return quantized, norms


def smoothquant_calibrate(model_dir: Path, handler: W8A8, ignore: tuple[str, ...], windows: torch.Tensor,
                          workdir: Path, alpha: float | None = 0.5, device: str = "cpu") -> SmoothQuantResult:
    """SmoothQuant + W8A8 calibration of every target linear of a Llama-family checkpoint, layer by layer.

    ignore: fnmatch patterns as in quantize_dir (the float layers); windows (S, T) token ids; alpha None:
    no smoothing (activation ranges only). Peak memory: one decoder layer in float32 + the activations
    (S, T, hidden) float32 + per-channel maxima (in,).
    """
    model_dir, workdir = Path(model_dir), Path(workdir)
    config, ckpt, (decoder_cls, _), x, layers = _prepare(model_dir, handler, ignore, windows, torch.device(device))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULT_INDEX).unlink(missing_ok=True)
    files: dict[str, str] = {}
    t_start = time.perf_counter()
    for i in range(config.num_hidden_layers):
        layer = ckpt.layer(decoder_cls, config, i)
        quantized, norms = _layer(i, layer, layers, x, handler, ignore, alpha)
        del layer
        if quantized or norms:
            file = f"layer-{i:05d}.safetensors"
            _save(workdir / file, quantized, norms)
            files |= dict.fromkeys([*quantized, *norms], file)
        log.info("SmoothQuant layer %d/%d: %d linears, %d norms smoothed", i + 1, config.num_hidden_layers,
                 len(quantized), len(norms))
    meta = {"act": handler.act, "alpha": alpha, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "seconds": time.perf_counter() - t_start, "peak_live_layers": ckpt.peak_live_layers, "files": files}
    tmp = workdir / f".{RESULT_INDEX}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, workdir / RESULT_INDEX)  # the index appears only when every layer file is written
    return SmoothQuantResult(workdir)


def quantize_w8a8(model_dir: Path, out_dir: Path, cfg, float_layers: frozenset[str] = frozenset()) -> dict:
    """The w8a8 / w8a8-dynamic quantize path: calibrate (SmoothQuant, activation ranges) one layer at a time,
    then stream the shards through quantize_dir with the smoothed norms and W8A8 weights; returns the
    manifest. down_proj stays float (DEFAULT_FLOAT, recorded in the manifest's float_layers)."""
    from npuflow.core.artifacts import staging_dir
    from npuflow.quant.schemes import get_handler
    from npuflow.quant.sensitivity import calibration_inputs
    from npuflow.quant.streaming import quantize_dir

    hf_config = json.loads((Path(model_dir) / "config.json").read_text())
    float_layers = frozenset(float_layers) | default_float_layers(hf_config["num_hidden_layers"])
    windows = calibration_inputs(model_dir, cfg)  # refuses the demo corpus on another model, no tokenizer
    with staging_dir("smoothquant") as work:
        result = smoothquant_calibrate(model_dir, get_handler(cfg), tuple(cfg.ignore) + tuple(float_layers),
                                       windows, Path(work), cfg.smoothquant_alpha)
        return quantize_dir(model_dir, out_dir, cfg, precomputed=result, float_layers=float_layers)
