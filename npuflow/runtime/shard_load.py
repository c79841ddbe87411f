"""Rank-local loading: each rank reads only its part of a checkpoint (native quantized or float), never a whole tensor.

A rank is placed by `Placement`: its tensor-parallel index within tp ranks, the decoder layers its
pipeline stage owns, and whether the stage holds the embedding (first) and the final norm + lm_head (last).
Decoder linears are read slice by slice from the safetensors files (file reads of just those bytes; see
read_slice for why not safe_open's get_slice), in the Megatron split runtime/parallel.py's shard_llama
cuts a loaded model into:
  column-parallel q/k/v/gate/up: rows [r*out/N, (r+1)*out/N) of weight (out, in), scale, zero and bias;
  row-parallel o/down: columns [r*in/N, (r+1)*in/N) of weight (packed int4: (out, in/2), so columns
  [r*in/2N, ...)), 4-bit scale/zero (out, groups) by whole groups, 8-bit per-channel scale (out,) and the
  bias whole (added once after the all_reduce). A static W8A8 linear's input scale and offset (1,) are read
  whole on every rank (see _quantized_module for what W8A8 does across ranks).
The embedding and lm_head are split by vocabulary rows over the tp ranks when tp divides the vocabulary
(Megatron/vLLM's VocabParallelEmbedding and vocab-parallel lm_head): rows [r*V/N, (r+1)*V/N) of the table and,
quantized (int8 per row, or int4 groups), of its scale and zero; the embedding looks up the ids it holds
(zeros elsewhere) and an all_reduce sums them, the head's logits are all-gathered. Everything else (norms;
the tables when tp does not divide the vocabulary, or a quantized tied table) is read whole, and only by
the stages that hold it. Layers of other stages are never read. The local layers are renumbered 0..n-1
(their KV cache slots) and config.num_hidden_layers becomes n on this rank's copy of the config.

Peak host memory per rank ~ its slices + the replicated parts + one 8 MiB chunk of rows; the heap the
reads freed goes back to the OS after loading (malloc_trim).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.formats.files import read_header, read_slice

log = logging.getLogger("npuflow.runtime")

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")
VOCAB_TABLES = ("model.embed_tokens.weight", "lm_head.weight")  # (vocab, d) each
VOCAB_MODULES = ("model.embed_tokens.", "lm_head.")  # their weight, weight_scale, weight_zero_point: rows by vocab
SCALE, ZERO = "weight_scale", "weight_zero_point"  # native format's names (npuflow/formats/native.py)
ACT_PARAMS = ("input_scale", "input_offset")  # static W8A8: float32 (1,) each


@dataclass(frozen=True)
class Placement:
    """Which part of the model one rank holds."""

    tp_rank: int = 0  # index within the tensor-parallel group, 0..tp-1
    tp: int = 1  # ranks each decoder linear is split over
    layers: range | None = None  # decoder layers this rank's pipeline stage owns (None: all)
    first: bool = True  # holds embed_tokens (the first pipeline stage)
    last: bool = True  # holds model.norm and lm_head (the last pipeline stage)
    vocab_parallel: bool = False  # embedding and lm_head (float or quantized) split by vocabulary rows over tp


def stage_layers(n_layers: int, stage: int, stages: int) -> range:
    """The contiguous layer range of `stage` of `stages` (equal sizes; the caller checks divisibility)."""
    if n_layers % stages:
        raise ConfigError(f"num_hidden_layers = {n_layers} does not split into {stages} pipeline stages; "
                          "choose a pp that divides it")
    n = n_layers // stages
    return range(stage * n, (stage + 1) * n)


def _split(name: str) -> tuple[int | None, str, str]:
    """'model.layers.3.mlp.down_proj.weight_scale' -> (3, 'mlp.down_proj', 'weight_scale'); others (None, ...)."""
    if not name.startswith("model.layers."):
        return None, "", name
    idx, _, rest = name.removeprefix("model.layers.").partition(".")
    module, _, leaf = rest.rpartition(".")
    return int(idx), module, leaf


def local_name(name: str, place: Placement, tied: bool) -> str | None:
    """The name this rank loads `name` under, or None when another stage holds it."""
    layer, _, _ = _split(name)
    if layer is not None:
        if place.layers is not None and layer not in place.layers:
            return None
        start = place.layers.start if place.layers is not None else 0
        return f"model.layers.{layer - start}." + name.removeprefix(f"model.layers.{layer}.")
    if name.startswith("model.embed_tokens."):
        if place.first:
            return name
        return name.replace("model.embed_tokens.", "lm_head.") if tied and place.last else None
    if name.startswith(("model.norm.", "lm_head.")):
        return name if place.last else None
    return name


def split_dim(name: str, ndim: int, bits: int | None, vocab_parallel: bool = False) -> int | None:
    """The dimension `name` is split along across tensor-parallel ranks (None: read whole)."""
    layer, module, leaf = _split(name)
    if layer is None:
        return 0 if vocab_parallel and name.startswith(VOCAB_MODULES) else None
    if leaf in ACT_PARAMS:  # a static W8A8 input's scale and offset, one each for the whole input
        return None
    if module in COLUMN:
        return 0
    if module in ROW:
        if leaf == "bias" or (leaf == SCALE and ndim == 1):  # added after the all_reduce / per output row
            return None
        return 1
    return None


def _part(name: str, shape: list[int], place: Placement, bits: int | None) -> tuple[int | None, tuple[int, int]]:
    """The split dimension of `name` on this rank and its [a, b) along it."""
    dim = split_dim(name, len(shape), bits, place.vocab_parallel) if place.tp > 1 else None
    if dim is None:
        return None, (0, 0)
    if shape[dim] % place.tp:
        raise ConfigError(f"{name} {tuple(shape)}: dimension {dim} ({shape[dim]}) does not split over tp = "
                          f"{place.tp} ranks; choose a tp that divides it")
    n = shape[dim] // place.tp
    return dim, (place.tp_rank * n, (place.tp_rank + 1) * n)


def read_local(model_dir: Path, place: Placement, tied: bool,
               dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """{local name: this rank's part} from every *.safetensors file (float tensors in `dtype`, None: as
    stored), and the quant manifest's tensors under their local names."""
    qm_path = model_dir / "quant_manifest.json"  # absent: an unquantized checkpoint (the reference)
    meta = json.loads(qm_path.read_text())["tensors"] if qm_path.is_file() else {}
    raw: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            header, base = read_header(f)
            for name, info in header.items():
                local = local_name(name, place, tied)
                if local is None:
                    continue
                weight = name.rsplit(".", 1)[0] + ".weight"
                bits = meta.get(weight, {}).get("bits") if meta.get(weight, {}).get("quantized") else None
                dim, part = _part(name, info["shape"], place, bits)
                raw[local] = read_slice(f, info, base, dim, part, dtype)
    local_meta = {}
    for name, m in meta.items():
        local = local_name(name, place, tied)
        if local is not None and local not in local_meta:
            local_meta[local] = m
    return raw, local_meta


def _quantized_module(old: nn.Module | None, path: str, raw: dict, m: dict, place: Placement, dtype: torch.dtype,
                      backend: ModuleType, group, act: str | None = None) -> nn.Module:
    """The QuantLinear of this rank's slices of `path` (row-parallel: inside a RowParallel).

    W8A8 (`act`): the static input scale and offset are the whole input's, and each rank's int32 correction
    uses the sums of its own weight columns, so the row-parallel partial sums add up to the one-device product
    exactly. Per-token (dynamic) activations are quantized on each rank's slice of the input, as vLLM's and
    vllm-ascend's row-parallel W8A8 linears do: one scale per token per rank, a finer quantization than one
    device's (not bit-equal to it)."""
    from npuflow.formats.native import unpack_int4
    from npuflow.runtime.loader import QuantLinear
    from npuflow.runtime.parallel import RowParallel

    dev, prefix = backend.device(), path + "."
    q = raw.pop(prefix + "weight")
    q = unpack_int4(q) if m["bits"] == 4 else q
    out_f, in_f = q.shape
    if m["group_size"] and in_f % m["group_size"]:
        raise ConfigError(f"{path}: {in_f} input features per rank do not split into whole int4 groups of "
                          f"{m['group_size']}; use a tp or group_size that does")
    bias = raw.pop(prefix + "bias", None)
    row = place.tp > 1 and ".".join(path.split(".")[-2:]) in ROW
    ql = QuantLinear(in_f, out_f, bias is not None and not row, m["bits"], m["group_size"], backend, act)
    ql.qweight, ql.scale = q.to(dev), raw.pop(prefix + SCALE).to(dev, torch.float32 if act else dtype)
    if act == "tensor":
        ql.input_scale, ql.input_offset = (raw.pop(prefix + k).to(dev, torch.float32) for k in ACT_PARAMS)
    if prefix + ZERO in raw:
        ql.zero = raw.pop(prefix + ZERO).to(dev, dtype)
    if bias is not None and not row:
        ql.bias = nn.Parameter(bias.to(dev, dtype), requires_grad=False)
    if row:
        return RowParallel(ql, bias.to(dev, dtype) if bias is not None else None, group)
    return ql


def _float_linear(path: str, raw: dict, place: Placement, dtype: torch.dtype, dev, group) -> nn.Module:
    """A decoder linear kept in float, from this rank's slices (row-parallel: inside a RowParallel)."""
    from npuflow.runtime.parallel import RowParallel

    w, bias = raw.pop(path + ".weight"), raw.pop(path + ".bias", None)
    row = place.tp > 1 and ".".join(path.split(".")[-2:]) in ROW
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None and not row, device="meta")
    lin.weight = nn.Parameter(w.to(dev, dtype), requires_grad=False)
    if bias is not None and not row:
        lin.bias = nn.Parameter(bias.to(dev, dtype), requires_grad=False)
    if row:
        return RowParallel(lin, bias.to(dev, dtype) if bias is not None else None, group)
    return lin


def _cut_model(model: nn.Module, place: Placement) -> None:
    """Keep this stage's layers (renumbered from 0) and the end parts it holds; the others become Identity."""
    if place.layers is not None:
        kept = [model.model.layers[i] for i in place.layers]
        for j, layer in enumerate(kept):
            layer.self_attn.layer_idx = j
        model.model.layers = nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in place.layers]
    if not place.first:
        model.model.embed_tokens = nn.Identity()
    if not place.last:
        model.model.norm, model.lm_head = nn.Identity(), nn.Identity()


def check_split(config, place: Placement) -> None:
    """Heads, kv heads and the MLP split over tp ranks (before any tensor is read)."""
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                    ("intermediate_size", config.intermediate_size)):
        if n % place.tp:
            raise ConfigError(f"{what} = {n} does not split over tp = {place.tp} ranks; choose a tp that divides it")


def load_rank_local(model_dir: Path, backend: ModuleType, dtype: torch.dtype, place: Placement, group=None,
                    graph: bool = False) -> nn.Module:
    """This rank's part of a native quantized checkpoint on the backend's device (see the module docstring).

    `group`: the tensor-parallel process group the row-parallel all_reduces run in (None: the default)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from npuflow.formats.native import ACT
    from npuflow.runtime.loader import W8Embedding, _rebuild_meta_buffers, _set_module, release_freed_heap

    qm = model_dir / "quant_manifest.json"  # absent: the unquantized reference, read the same way
    manifest = json.loads(qm.read_text()) if qm.is_file() else {"format": "native"}
    fmt, act = manifest["format"], ACT.get(manifest.get("scheme"))
    if fmt != "native":
        raise ConfigError(f"rank-local loading reads the native format; {model_dir} is {fmt!r}: convert with "
                          "quantization.format: native for tensor- or pipeline-parallel runs")
    config = copy.deepcopy(AutoConfig.from_pretrained(model_dir))
    check_split(config, place)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    float_tables = not any(meta_quantized(model_dir, n) for n in VOCAB_TABLES)
    place = replace(place, vocab_parallel=place.tp > 1 and config.vocab_size % place.tp == 0
                    and (float_tables or not tied))  # a quantized tied table is read whole
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _cut_model(model, place)
    raw, meta = read_local(model_dir, place, tied, dtype)
    dev = backend.device()
    for name, m in meta.items():
        if not m.get("quantized") or name not in raw or (place.vocab_parallel and name in VOCAB_TABLES):
            continue  # vocabulary-split tables: _vocab_parallel_tables
        path = name.removesuffix(".weight")
        old = model.get_submodule(path)
        if isinstance(old, nn.Embedding):
            if m["bits"] != 8:
                raise NpuflowError(f"{path}: only 8-bit embeddings are supported; keep it in float (ignore)")
            emb = W8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx)
            emb.weight, emb.weight_scale = raw.pop(name).to(dev), raw.pop(path + "." + SCALE).to(dev, dtype)
            _set_module(model, path, emb)
            continue
        _set_module(model, path, _quantized_module(old, path, raw, m, place, dtype, backend, group, act))
    for i in range(len(model.model.layers) if place.tp > 1 else 0):  # decoder linears kept in float
        for path in (*COLUMN, *ROW):
            full = f"model.layers.{i}.{path}"
            if full + ".weight" in raw:
                _set_module(model, full, _float_linear(full, raw, place, dtype, dev, group))
    if place.vocab_parallel:
        _vocab_parallel_tables(model, raw, meta, place, dtype, backend, group, tied)
    sd = {k: (t.to(dev, dtype) if t.is_floating_point() else t.to(dev)) for k, t in raw.items()}
    raw.clear()
    _, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k, t in [*model.named_parameters(), *model.named_buffers(remove_duplicate=False)]
               if t is not None and t.is_meta and "rotary_emb" not in k]
    share = {"lm_head.weight"} if tied and place.first and place.last and not place.vocab_parallel else set()
    if set(missing) - share or unexpected:
        raise NpuflowError(f"{model_dir} does not match its config.json on this rank: missing "
                           f"{sorted(set(missing) - share)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if share:
        model.lm_head.weight = model.model.embed_tokens.weight
    _rebuild_meta_buffers(model, model.config, dev)
    model.eval()
    model = backend.prepare(model, graph=graph)
    release_freed_heap()
    return model


def loaded_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Bytes of the whole model as one device loads it (float tensors in `dtype`, int4 one byte a value),
    from the safetensors headers alone."""
    from safetensors import safe_open

    qm_path = model_dir / "quant_manifest.json"
    meta = json.loads(qm_path.read_text())["tensors"] if qm_path.is_file() else {}
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                if sl.get_dtype() in ("F32", "F16", "BF16", "F64"):
                    total += n * dtype.itemsize
                else:
                    total += n * (2 if meta.get(name, {}).get("bits") == 4 else 1)
    return total


def _vocab_rows(rows: torch.Tensor | nn.Module) -> tuple[str, int]:
    """('weight', n) for a float table of n rows, ('local', n) for a quantized module holding n rows."""
    if isinstance(rows, torch.Tensor):
        return "weight", rows.shape[0]
    return "local", (rows.qweight if hasattr(rows, "qweight") else rows.weight).shape[0]


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + V/N) of the embedding: a float table (`weight`) or an int8 one
    (`local`, a W8Embedding of those rows); ids elsewhere give zeros, and an all_reduce over the tp ranks
    sums the one non-zero row of each token (exact), as Megatron's VocabParallelEmbedding."""

    def __init__(self, rows: torch.Tensor | nn.Module, start: int, group=None):
        super().__init__()
        kind, self.rows = _vocab_rows(rows)
        if kind == "weight":
            self.weight = nn.Parameter(rows, requires_grad=False)  # (V / N, d)
        else:
            self.local = rows
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, T) -> (B, T, d)
        import torch.distributed as dist

        from npuflow.runtime.parallel import timed

        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        local = local.masked_fill(outside, 0)
        out = nn.functional.embedding(local, self.weight) if hasattr(self, "weight") else self.local(local)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        timed(dist.all_reduce, out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """lm_head split by vocabulary rows: a float table (`weight`, (V/N, d)) or a quantized linear of those
    rows (`local`, a QuantLinear: int8 per-row scales or int4 groups); each rank's (..., V/N) logits,
    all-gathered into (..., V)."""

    def __init__(self, rows: torch.Tensor | nn.Module, tp: int, group=None):
        super().__init__()
        kind, _ = _vocab_rows(rows)
        if kind == "weight":
            self.weight = nn.Parameter(rows, requires_grad=False)  # (V / N, d)
        else:
            self.local = rows
        self.tp, self.group = tp, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., d) -> (..., V)
        import torch.distributed as dist

        from npuflow.runtime.parallel import timed

        # (rows, d) with plain strides: the model hands in hidden_states[:, -1:] of a prompt, whose strides
        # make F.linear copy the whole weight transposed (measured: +62 MiB a prefill for 16000 x 2048 bf16)
        flat = x.reshape(-1, x.shape[-1])
        part = nn.functional.linear(flat, self.weight) if hasattr(self, "weight") else self.local(flat)
        parts = [torch.empty_like(part) for _ in range(self.tp)]
        timed(dist.all_gather, parts, part.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], -1)


def _vocab_parallel_tables(model: nn.Module, raw: dict, meta: dict, place: Placement, dtype: torch.dtype,
                           backend: ModuleType, group, tied: bool) -> None:
    """Embedding and lm_head from this rank's vocabulary rows (place.vocab_parallel), float or quantized."""
    from npuflow.runtime.loader import W8Embedding

    dev = backend.device()
    for name, path in (("model.embed_tokens.weight", "model.embed_tokens"), ("lm_head.weight", "lm_head")):
        if name not in raw:
            continue
        m = meta.get(name, {})
        if not m.get("quantized"):
            rows: torch.Tensor | nn.Module = raw.pop(name).to(dev, dtype)  # (V / N, d)
        elif path == "lm_head":
            rows = _quantized_module(None, path, raw, m, place, dtype, backend, group)
        else:
            if m["bits"] != 8:
                raise NpuflowError(f"{path}: only 8-bit embeddings are supported; keep it in float (ignore)")
            q = raw.pop(name)
            rows = W8Embedding(q.shape[0], q.shape[1], None)
            rows.weight, rows.weight_scale = q.to(dev), raw.pop(path + "." + SCALE).to(dev, dtype)
        if path == "lm_head":
            model.lm_head = VocabParallelHead(rows, place.tp, group)
        else:
            model.model.embed_tokens = VocabParallelEmbedding(rows, place.tp_rank * _vocab_rows(rows)[1], group)
            if tied and place.last:  # lm_head shares these rows (float: quantized tied tables are read whole)
                model.lm_head = VocabParallelHead(model.model.embed_tokens.weight, place.tp, group)


def meta_quantized(model_dir: Path, name: str) -> bool:
    """Whether the quant manifest lists `name` as an integer weight."""
    qm = model_dir / "quant_manifest.json"
    return qm.is_file() and bool(json.loads(qm.read_text())["tensors"].get(name, {}).get("quantized"))
