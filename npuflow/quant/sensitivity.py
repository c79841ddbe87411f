"""Per-linear sensitivity: fused groups (never split) ranked by their worst member's output error."""

from __future__ import annotations

from pathlib import Path

import torch

from npuflow.quant.checkpoint import is_target
from npuflow.quant.gptq import INPUT_GROUPS, _hessians, _prepare, output_error

SENSITIVITY = "sensitivity.json"
# linears that share an input are kept float together, never split: (group name, member modules)
FUSED_GROUPS = (
    ("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


def fused_group(name: str) -> tuple[str, tuple[str, ...]]:
    """model.layers.3.self_attn.k_proj.weight -> ("model.layers.3.self_attn.qkv", (q, k, v module names))."""
    module = name.removesuffix(".weight")
    for group, members in FUSED_GROUPS:
        for m in members:
            if module.endswith("." + m):
                base = module.removesuffix(m)
                return base + group, tuple(base + x for x in members)
    return module, (module,)


def rank_groups(errors: dict[str, float]) -> list[tuple[str, float, tuple[str, ...]]]:
    """Fused groups by their worst member's error, most sensitive first: (group, error, modules)."""
    worst: dict[str, tuple[float, tuple[str, ...]]] = {}
    for name, err in errors.items():
        group, members = fused_group(name)
        worst[group] = (max(err, worst.get(group, (0.0, ()))[0]), members)
    return sorted(((g, e, m) for g, (e, m) in worst.items()), key=lambda x: -x[1])


def rtn_sensitivity(model_dir: Path, handler, ignore: tuple[str, ...], windows: torch.Tensor,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Relative output error of each target linear rounded to nearest, on the float model's own inputs.

    ||X W^T - X W_q^T||^2 / ||X W^T||^2 per linear (X: its calibration inputs), one decoder layer in
    memory at a time, as GPTQ does; the layers stay float so each error is that linear's alone.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    config, ckpt, (decoder_cls, _), x, layers = _prepare(model_dir, handler, ignore, windows, device)
    errors: dict[str, float] = {}
    for i in range(config.num_hidden_layers):
        layer = ckpt.layer(decoder_cls, config, i).to(device, torch.float32)
        readers = [grp for grp in INPUT_GROUPS if any(is_target(f"model.layers.{i}.{m}.weight", ignore) for m in grp)]
        hs = _hessians(layers, layer, [grp[0] for grp in readers], x)
        for grp in readers:
            for m in grp:
                name = f"model.layers.{i}.{m}.weight"
                if is_target(name, ignore):
                    w = layer.get_submodule(m).weight.detach()
                    errors[name] = output_error(w, handler.quantize(w).dequantize(), hs[grp[0]])
        del hs
        layers.run(layer, x, keep=True)
        del layer
    return errors
