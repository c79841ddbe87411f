"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): calibrated integer weights, one decoder layer in memory at a time."""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from npuflow.core.errors import NpuflowError
from npuflow.formats import QuantizedWeight
from npuflow.quant.checkpoint import INDEX, check_llama, is_target, shard_names
from npuflow.quant.primitives import group_params_asym, quantize_per_channel_int8, quantize_with_params
from npuflow.quant.schemes import for_tensor

log = logging.getLogger("npuflow.gptq")

RESULT_INDEX = "gptq.json"  # in workdir: which file holds each tensor, per-linear stats, run parameters
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
FORWARD_BATCH = 8  # calibration windows per forward pass (bounds the (B, heads, T, T) attention scores)
DAMP_RETRIES = 4  # times the dampening grows 10x when H + damp*I is still not positive definite

# Linears that read the same input share one Hessian, in forward order: (module that reads it, *others).
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# architecture -> (transformers modeling module, class prefix of its DecoderLayer / RotaryEmbedding / RMSNorm)
ARCHITECTURES = {
    "LlamaForCausalLM": ("transformers.models.llama.modeling_llama", "Llama"),
    "MistralForCausalLM": ("transformers.models.mistral.modeling_mistral", "Mistral"),
}


# ---- the algorithm on one weight -----------------------------------------------------------------


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 = U^T U, float32 (in, in).

    h (float64) is dampened in place: the caller passes its own copy. At most 3 (in, in) float64 live at once.
    """
    diag = h.diagonal()
    base = diag.clone()  # (in,)
    for attempt in range(DAMP_RETRIES + 1):
        diag.copy_(base + damp * 10**attempt * base.mean())
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            if attempt:
                log.warning("Hessian not positive definite at damp %g; used %g", damp, damp * 10**attempt)
            hinv = torch.cholesky_inverse(lower)  # (in, in) H^-1
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info == 0:
                return upper.float()
    raise NpuflowError(f"the Hessian stayed singular with dampening up to {damp * 10**DAMP_RETRIES:g}; "
                       "use more calibration samples or a larger damp")


def gptq_weight(
    w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None,
    damp: float = 0.01, block_size: int = 128, act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ of one weight w (out, in) given its input Hessian h = 2 X^T X / N (in, in).

    group_size None: symmetric int8 per output channel (W8A16's representation), scales from the full rows.
    Otherwise asymmetric `bits`-bit groups of input channels (W4A16's); each group's scale/zero is computed
    from the group's *updated* weights when the algorithm reaches its first column. With act_order the
    columns are visited by decreasing diag(H) and the groups are fixed up front from the original weights
    ("static groups"), so a group still covers consecutive input channels and no permutation is stored.
    """
    out_f, in_f = w.shape
    if group_size and in_f % group_size:
        raise NpuflowError(f"group size {group_size} does not divide the input dimension {in_f}")
    W = w.float().clone()  # (out, in), updated in place as columns are quantized
    H = h.double().clone()  # (in, in)
    dead = H.diagonal() == 0  # inputs that are always zero: their weights never matter
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    zero: torch.Tensor | None
    if group_size is None:
        scale, zero = quantize_per_channel_int8(W)[1], None  # (out,)
        q_all = torch.zeros(out_f, in_f, dtype=torch.int8, device=W.device)
    else:
        if act_order:
            scale, zero = group_params_asym(W, bits, group_size)  # (out, in // g) static groups
        else:
            scale = torch.zeros(out_f, in_f // group_size, device=W.device)  # (out, in // g), filled below
            zero = torch.zeros_like(scale)
        q_all = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
        # a group must not straddle two blocks: its params are read from the current block's weights
        block_size = max(group_size, block_size // group_size * group_size)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(in_f, device=W.device)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    order = perm.tolist()  # processing position -> input channel, on the host (no device sync per column)
    u = _inverse_cholesky(H, damp)  # (in, in) upper: row j holds the error-propagation weights of column j
    del H

    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb = W[:, b0:b1].clone()  # (out, b) this block, kept up to date column by column
        err = torch.zeros_like(wb)  # (out, b) scaled errors, applied to the later blocks in one matmul
        ub = u[b0:b1, b0:b1]  # (b, b)
        for j in range(b1 - b0):
            col = order[b0 + j]  # input channel being quantized
            x = wb[:, j]  # (out,)
            if group_size is None:
                q = torch.round(x / scale).clamp_(-127, 127)
                deq = q * scale
            else:
                g = col // group_size
                if not act_order and col % group_size == 0:  # group starts: params from its updated weights
                    s, z = group_params_asym(wb[:, j : j + group_size], bits, group_size)  # (out, 1) each
                    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                s, z = scale[:, g : g + 1], zero[:, g : g + 1]
                q = quantize_with_params(x[:, None], s, z, bits)[:, 0]  # (out,) uint8
                deq = (q.float() - z[:, 0]) * s[:, 0]
            q_all[:, col] = q.to(q_all.dtype)
            e = (x - deq) / ub[j, j]  # (out,)
            wb[:, j:].addr_(e, ub[j, j:], alpha=-1)  # compensate on the not-yet-quantized columns
            err[:, j] = e
        W[:, b1:].sub_(err @ u[b0:b1, b1:])  # lazy batch update of everything after the block
    return QuantizedWeight(q_all, scale, zero, bits, group_size)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """||X W^T - X Ŵ^T||² / ||X W^T||² from H ∝ X^T X alone: tr(D H D^T) / tr(W H W^T), D = W - Ŵ."""
    w64, d64, h64 = w.double(), (w.double() - w_hat.double()), h.double()
    ref = ((w64 @ h64) * w64).sum()
    return float(((d64 @ h64) * d64).sum() / ref.clamp(min=1e-300))


# ---- lazy access to the float checkpoint ---------------------------------------------------------


class _Checkpoint:
    """Reads tensors by name from the safetensors shards; counts the decoder layers alive at once."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        if (model_dir / INDEX).is_file():
            shard_names(model_dir)  # every shard the index names exists
            self.where: dict[str, str] = json.loads((model_dir / INDEX).read_text())["weight_map"]
        else:
            (shard,) = shard_names(model_dir)
            with safe_open(model_dir / shard, framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), shard)
        self.reads: list[str] = []  # tensor names in the order they were read
        self.live_layers = 0  # decoder layers built by layer() and not yet freed
        self.peak_live_layers = 0

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise NpuflowError(f"{self.dir} has no tensor {missing[0]} (and {len(missing) - 1} more)")
        by_shard: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_shard[self.where[n]].append(n)
        out = {}
        for shard, shard_tensors in by_shard.items():
            with safe_open(self.dir / shard, framework="pt") as f:
                out |= {n: f.get_tensor(n) for n in shard_tensors}
        self.reads.extend(names)
        return out

    def layer(self, cls: type[nn.Module], config, i: int) -> nn.Module:
        """Decoder layer i built on the meta device, its weights read from the shards and assigned (no copy)."""
        with torch.device("meta"):
            layer = cls(config, i)
        prefix = f"model.layers.{i}."
        state = self.read([prefix + k for k in layer.state_dict()])
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, assign=True, strict=True)
        self.live_layers += 1
        self.peak_live_layers = max(self.peak_live_layers, self.live_layers)
        weakref.finalize(layer, self._freed)
        return layer.eval()

    def _freed(self) -> None:
        self.live_layers -= 1


# ---- the result: lazy mapping over per-layer files -----------------------------------------------


class GPTQResult(Mapping[str, QuantizedWeight]):
    """Tensor name -> QuantizedWeight, read on access from the per-layer safetensors files in workdir.

    Reopen a finished run with GPTQResult(workdir). `stats[name]` = {"rtn_err", "gptq_err"}: relative output
    error on the calibration activations; `info`: run parameters and the loader's counters.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        index = self.workdir / RESULT_INDEX
        if not index.is_file():
            raise NpuflowError(f"{self.workdir} has no {RESULT_INDEX}: GPTQ did not finish there")
        meta = json.loads(index.read_text())
        self.files: dict[str, str] = meta.pop("files")  # tensor name -> file in workdir
        self.stats: dict[str, dict[str, float]] = meta.pop("stats")
        self.info: dict = meta

    def __getitem__(self, name: str) -> QuantizedWeight:
        file = self.files[name]  # KeyError: not quantized by GPTQ (Mapping.get gives None)
        with safe_open(self.workdir / file, framework="pt") as f:
            zero = f.get_tensor(f"{name}.zero") if f"{name}.zero" in f.keys() else None
            group_size = int(f.metadata()["group_size"]) or None
            return QuantizedWeight(f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.scale"), zero,
                                   int(f.metadata()["bits"]), group_size)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _save(path: Path, results: dict[str, QuantizedWeight], bits: int, group_size: int | None) -> None:
    tensors = {}
    for name, qw in results.items():
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = qw.qweight.cpu(), qw.scale.cpu().contiguous()
        if qw.zero is not None:
            tensors[f"{name}.zero"] = qw.zero.cpu().contiguous()
    save_file(tensors, path, metadata={"bits": str(bits), "group_size": str(group_size or 0)})


# ---- sequential quantization of a model ----------------------------------------------------------


def calibration_windows(model_dir: Path, text: str, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) token ids of `text` (the text itself) from the model's tokenizer, evenly spaced."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 62  # the text is cut into windows here, not fed whole
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (N,)
    if ids.numel() < seq_len:
        raise NpuflowError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                           "use a longer text or a smaller calibration.seq_len")
    if samples * seq_len > ids.numel():
        log.warning("calibration text has %d tokens < %d samples x %d: windows overlap", ids.numel(), samples,
                    seq_len)
    starts = torch.linspace(0, ids.numel() - seq_len, samples).round().long().tolist()
    return torch.stack([ids[s : s + seq_len] for s in starts])  # (samples, seq_len)


class _Layers:
    """Calls decoder layers the way transformers' LlamaModel.forward does: RoPE cos/sin and the causal mask."""

    def __init__(self, config, rotary: nn.Module, seq_len: int, device: torch.device):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        self.config = config
        self.mask_fn = create_sliding_window_causal_mask if getattr(config, "sliding_window", None) \
            else create_causal_mask
        self.position_ids = torch.arange(seq_len, device=device)[None]  # (1, T)
        probe = torch.zeros(1, seq_len, config.hidden_size, device=device)
        self.rope = rotary(probe, position_ids=self.position_ids)  # cos, sin: (1, T, head_dim)

    @torch.no_grad()
    def run(self, layer: nn.Module, x: torch.Tensor, keep: bool) -> None:
        """Layer over x (S, T, d) in batches; keep: overwrite x with the outputs (else only hooks see it)."""
        for s in range(0, x.shape[0], FORWARD_BATCH):
            xb = x[s : s + FORWARD_BATCH]  # (B, T, d)
            mask = self.mask_fn(config=self.config, inputs_embeds=xb, attention_mask=None, cache=None,
                                position_ids=self.position_ids)
            y = layer(xb, attention_mask=mask, position_ids=self.position_ids, position_embeddings=self.rope)
            if keep:
                xb.copy_(y)


def _hessians(layers: _Layers, layer: nn.Module, readers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / N (in, in) float64 of the input of each module in `readers`, over all S*T tokens."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = defaultdict(int)

    def hook(name: str):
        def accumulate(_module: nn.Module, args: tuple) -> None:
            inp = args[0].reshape(-1, args[0].shape[-1]).double()  # (B*T, in)
            acc[name] = acc[name] + inp.T @ inp if name in acc else inp.T @ inp
            count[name] += inp.shape[0]
        return accumulate

    handles = [layer.get_submodule(r).register_forward_pre_hook(hook(r)) for r in readers]
    try:
        layers.run(layer, x, keep=False)
    finally:
        for h in handles:
            h.remove()
    return {r: acc[r] * (2.0 / count[r]) for r in readers}


def _quantize_linear(
    lin: nn.Linear, name: str, h: torch.Tensor, handler, damp: float, block_size: int, act_order: bool,
) -> tuple[QuantizedWeight, dict[str, float]]:
    """GPTQ lin's weight with Hessian h, put the dequantized result in its place; return it and its errors."""
    w = lin.weight.detach()
    t0 = time.perf_counter()
    qw = gptq_weight(w, h, handler.bits, handler.group_size, damp, block_size, act_order)
    w_hat = qw.dequantize()
    stats = {"rtn_err": output_error(w, handler.quantize(w).dequantize(), h), "gptq_err": output_error(w, w_hat, h)}
    log.debug("%s: output error gptq %.3e rtn %.3e (%.2fs)", name, stats["gptq_err"], stats["rtn_err"],
              time.perf_counter() - t0)
    lin.weight.data = w_hat.to(w.dtype)  # the quantized weight is what later linears and layers see
    return qw, stats


def _prepare(model_dir: Path, handler, ignore: tuple[str, ...], windows: torch.Tensor, device: torch.device):
    """Config, checkpoint reader, (decoder, norm) classes, embedded calibration inputs (S, T, d), layer runner."""
    from transformers import AutoConfig

    hf_config = json.loads((model_dir / "config.json").read_text())
    check_llama(hf_config)
    module_name, prefix = next(ARCHITECTURES[a] for a in hf_config["architectures"] if a in ARCHITECTURES)
    modeling = importlib.import_module(module_name)
    decoder_cls, rotary_cls, norm_cls = (getattr(modeling, f"{prefix}{c}")
                                         for c in ("DecoderLayer", "RotaryEmbedding", "RMSNorm"))
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"  # None would give no causal mask to the eager attention
    ckpt = _Checkpoint(model_dir)
    emb = ckpt.read([EMBED])[EMBED]  # (V, d)
    if is_target(EMBED, ignore):  # not a linear: quantize_dir rounds it; calibrate on what the runtime will see
        emb = handler.quantize(emb).dequantize()
    x = nn.functional.embedding(windows.to(device), emb.to(device, torch.float32))  # (S, T, d) float32
    layers = _Layers(config, rotary_cls(config=config).to(device), windows.shape[1], device)
    return config, ckpt, (decoder_cls, norm_cls), x, layers


def gptq_quantize(
    model_dir: Path, handler, ignore: tuple[str, ...], windows: torch.Tensor, workdir: Path,
    damp: float = 0.01, block_size: int = 128, act_order: bool = False, *,
    true_sequential: bool = True, device: str | torch.device = "cpu",
) -> GPTQResult:
    """GPTQ every target linear of a Llama-family checkpoint, layer by layer; results go to workdir.

    handler: W8A16 or W4A16 (its bits and group_size); ignore: fnmatch patterns as in quantize_dir;
    windows (S, T) token ids. Layer i's Hessians are measured on the outputs of layers < i already quantized.
    true_sequential: inside a layer, measure each input group (qkv, o, gate/up, down) after quantizing the
    groups before it (one forward per group) instead of all from the float layer.
    device: where the layer, activations and Hessians live (the checkpoint is read on the host).
    Peak memory: one decoder layer's weights (float32 on device) + the activations (S, T, hidden) float32,
    updated in place + the (in, in) float64 Hessians of the input groups being quantized (one group with
    true_sequential, all four without) + 3 transient (in, in) float64 in gptq_weight.
    """
    model_dir, workdir, device = Path(model_dir), Path(workdir), torch.device(device)
    config, ckpt, (decoder_cls, norm_cls), x, layers = _prepare(model_dir, handler, ignore, windows, device)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULT_INDEX).unlink(missing_ok=True)
    n_layers, (samples, seq_len) = config.num_hidden_layers, windows.shape
    files: dict[str, str] = {}
    stats: dict[str, dict[str, float]] = {}
    t_start = time.perf_counter()
    log.info("GPTQ %d-bit (group %s) on %d windows x %d tokens, %d layers, damp %g, act_order %s",
             handler.bits, handler.group_size, samples, seq_len, n_layers, damp, act_order)

    for i in range(n_layers):
        t0 = time.perf_counter()
        layer = ckpt.layer(decoder_cls, config, i).to(device, torch.float32)
        groups = [[m for m in grp if is_target(f"model.layers.{i}.{m}.weight", ignore)] for grp in INPUT_GROUPS]
        readers = [(grp[0], targets) for grp, targets in zip(INPUT_GROUPS, groups, strict=True) if targets]
        stages = [[r] for r in readers] if true_sequential else [readers]
        results: dict[str, QuantizedWeight] = {}
        for stage in stages:
            hs = _hessians(layers, layer, [reader for reader, _ in stage], x)
            for reader, targets in stage:
                for m in targets:
                    name = f"model.layers.{i}.{m}.weight"
                    results[name], stats[name] = _quantize_linear(
                        layer.get_submodule(m), name, hs[reader], handler, damp, block_size, act_order)
            del hs
        layers.run(layer, x, keep=True)  # outputs of the quantized layer feed layer i + 1
        del layer  # frees the layer's weights before the next layer is read
        if results:
            file = f"layer-{i:05d}.safetensors"
            _save(workdir / file, results, handler.bits, handler.group_size)
            files |= dict.fromkeys(results, file)
        errs = [stats[n] for n in results]
        log.info("layer %d/%d: %d linears in %.1fs, mean output error gptq %.3e vs rtn %.3e", i + 1, n_layers,
                 len(results), time.perf_counter() - t0,
                 sum(e["gptq_err"] for e in errs) / max(1, len(errs)),
                 sum(e["rtn_err"] for e in errs) / max(1, len(errs)))

    if HEAD in ckpt.where and is_target(HEAD, ignore):  # its input is the final norm of the last hidden state
        t = ckpt.read([NORM, HEAD])
        norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps).to(device)
        norm.weight.data = t[NORM].to(device, torch.float32)
        head = nn.Linear(config.hidden_size, t[HEAD].shape[0], bias=False, device="meta")
        head.weight = nn.Parameter(t[HEAD].to(device, torch.float32), requires_grad=False)
        with torch.no_grad():
            xn = norm(x).reshape(-1, config.hidden_size).double()  # (S*T, d)
        h = (xn.T @ xn) * (2.0 / xn.shape[0])
        qw, stats[HEAD] = _quantize_linear(head, HEAD, h, hh := for_tensor(handler, HEAD), damp, block_size, act_order)
        _save(workdir / "lm_head.safetensors", {HEAD: qw}, hh.bits, hh.group_size)  # int8 in a 4-bit model too
        files[HEAD] = "lm_head.safetensors"
        log.info("lm_head: output error gptq %.3e vs rtn %.3e", stats[HEAD]["gptq_err"], stats[HEAD]["rtn_err"])

    seconds = time.perf_counter() - t_start
    meta = {
        "bits": handler.bits, "group_size": handler.group_size, "damp": damp, "block_size": block_size,
        "act_order": act_order, "true_sequential": true_sequential, "samples": samples, "seq_len": seq_len,
        "seconds": seconds, "peak_live_layers": ckpt.peak_live_layers, "tensors_read": ckpt.reads,
        "files": files, "stats": stats,
    }
    tmp = workdir / f".{RESULT_INDEX}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, workdir / RESULT_INDEX)  # the index appears only when every layer file is written
    log.info("GPTQ done: %d linears in %.1fs", len(files), seconds)
    return GPTQResult(workdir)
