"""Per-linear sensitivity: fused groups (never split) ranked by their worst member's output error."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from npuflow.quant.checkpoint import calibrated_by, check_calibration, is_target, load_tokenizer
from npuflow.quant.gptq import HEAD, INPUT_GROUPS, NORM, _prepare
from npuflow.quant.schemes import for_tensor

log = logging.getLogger("npuflow.quantize")

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


def calibration_inputs(model_dir: Path, cfg, texts: dict[str, str] | None = None) -> torch.Tensor:
    """(samples, seq_len) calibration token ids, after refusing a run without real text or a tokenizer.

    cfg: QuantizationConfig. Everything is checked before any quantization work (check_calibration),
    and a tokenizer that cannot be built is one clear error, not transformers' traceback.
    """
    import json

    from npuflow.core.text import load_eval_text
    from npuflow.quant.gptq import calibration_windows

    model_dir = Path(model_dir)
    check_calibration(cfg, json.loads((model_dir / "config.json").read_text()),
                      [p.name for p in model_dir.iterdir()], texts)
    load_tokenizer(model_dir, " and ".join(calibrated_by(cfg)))
    cal = cfg.calibration
    return calibration_windows(model_dir, load_eval_text(cal.text), cal.samples, cal.seq_len)


def rtn_sensitivity(model_dir: Path, handler, ignore: tuple[str, ...], windows: torch.Tensor,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Relative output error of each target linear rounded to nearest, on the float model's own inputs.

    ||X W^T - X W_q^T||^2 / ||X W^T||^2 per linear (X: its calibration inputs, measured directly, batch by
    batch, as the layer runs), one decoder layer in memory at a time, as GPTQ does; the layers stay float
    so each error is that linear's alone. Peak memory: one decoder layer in float32, its weights'
    rounding errors W - W_q (the same size), the activations (S, T, hidden) float32, one batch's outputs.
    """
    from tqdm import tqdm

    model_dir, device = Path(model_dir), torch.device(device)
    config, ckpt, (decoder_cls, norm_cls), x, layers = _prepare(model_dir, handler, ignore, windows, device)
    errors: dict[str, float] = {}
    for i in tqdm(range(config.num_hidden_layers), desc="sensitivity", unit="layer", disable=None):
        layer = ckpt.layer(decoder_cls, config, i).to(device, torch.float32)
        targets = [m for grp in INPUT_GROUPS for m in grp if is_target(f"model.layers.{i}.{m}.weight", ignore)]
        sums = {m: torch.zeros(2, dtype=torch.float64, device=device) for m in targets}  # (error, output) energy
        handles = [layer.get_submodule(m).register_forward_hook(_error_hook(layer.get_submodule(m), handler,
                                                                            sums[m])) for m in targets]
        try:
            layers.run(layer, x, keep=True)  # outputs of the float layer feed layer i + 1
        finally:
            for h in handles:
                h.remove()
        errors |= {f"model.layers.{i}.{m}.weight": float(e / o.clamp(min=1e-300)) for m, (e, o) in sums.items()}
        del layer, handles
        log.info("sensitivity: layer %d/%d measured (%d linears)", i + 1, config.num_hidden_layers, len(targets))
    if HEAD in ckpt.where and is_target(HEAD, ignore):  # its input: the final norm of the last hidden state
        errors[HEAD] = _head_error(ckpt, config, norm_cls, x, for_tensor(handler, HEAD), device)
    return errors


def _head_error(ckpt, config, norm_cls, x: torch.Tensor, handler, device: torch.device) -> float:
    """The lm_head's relative output error, as a decoder linear's, one window at a time (logits are V wide)."""
    t = ckpt.read([NORM, HEAD])
    norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps).to(device)
    norm.weight.data = t[NORM].to(device, torch.float32)
    head = torch.nn.Linear(config.hidden_size, t[HEAD].shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(t[HEAD].to(device, torch.float32), requires_grad=False)
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    hook = _error_hook(head, handler, acc)
    with torch.no_grad():
        for window in x:  # (T, d)
            xn = norm(window)
            hook(head, (xn,), head(xn))
    return float(acc[0] / acc[1].clamp(min=1e-300))


def _error_hook(lin: torch.nn.Linear, handler, acc: torch.Tensor):
    """Forward hook adding ||x (W - W_q)^T||^2 and ||x W^T||^2 of each batch into acc (2,) float64."""
    w = lin.weight.detach()
    delta = w - handler.quantize(w).dequantize().to(w.dtype)  # (out, in) rounding error of this linear

    def hook(_module, args: tuple, y: torch.Tensor) -> None:
        inp = args[0].reshape(-1, args[0].shape[-1])  # (B*T, in)
        acc[0] += (inp @ delta.T).double().square().sum()
        acc[1] += y.double().square().sum()
    return hook
