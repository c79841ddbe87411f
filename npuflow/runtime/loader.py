"""Model runtime: load a quantized artifact onto a device with the backend's kernels, and the float reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from npuflow.core.errors import NpuflowError

log = logging.getLogger("npuflow.runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantLinear(nn.Module):
    """A linear layer with integer weights, computed by the device's weight-only kernel.

    8-bit: y = x @ (qweight * scale[:, None]).T;  4-bit: y = x @ ((qweight - zero) * scale).T per group.
    act "token" | "tensor" (W8A8): x is quantized to int8 too (per token, or with the static input_scale and
    input_offset (1,)) and the product is an int8 GEMM (backend.linear_w8a8); scale stays float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None,
                 backend: ModuleType, act: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.backend, self.act = backend, act
        static = act == "tensor"
        self.register_buffer("input_scale", torch.empty(1, device="meta") if static else None)
        self.register_buffer("input_offset", torch.empty(1, device="meta") if static else None)
        self.wsum: torch.Tensor | None = None  # (out,) int32 sum of each weight row, for a static input offset
        groups = in_features // group_size if group_size else None
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=qdtype, device="meta"))
        self.register_buffer("scale", torch.empty((out_features, groups) if groups else out_features, device="meta"))
        self.register_buffer("zero", torch.empty(out_features, groups, device="meta") if bits == 4 else None)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        if self.act is not None:
            if self.act == "tensor" and self.wsum is None:
                self.wsum = self.qweight.sum(dim=1, dtype=torch.int32)
            y = self.backend.linear_w8a8(x, self.qweight, self.scale, self.input_scale, self.input_offset, self.wsum)
        elif self.bits == 8:
            y = self.backend.linear_w8a16(x, self.qweight, self.scale)
        else:
            y = self.backend.linear_w4a16(x, self.qweight, self.scale, self.zero, self.group_size)
        return y + self.bias if self.bias is not None else y


class W8Embedding(nn.Module):
    """Embedding rows stored int8 with one scale per row (per output channel of the table)."""

    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None):
        super().__init__()
        self.padding_idx = padding_idx
        self.register_buffer("weight", torch.empty(num_embeddings, dim, dtype=torch.int8, device="meta"))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, device="meta"))  # (vocab,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, T) -> (B, T, dim)
        rows = nn.functional.embedding(ids, self.weight)
        return rows.to(self.weight_scale.dtype) * self.weight_scale[ids].unsqueeze(-1)


def resolve_dtype(name: str, backend: ModuleType) -> torch.dtype:
    return backend.default_dtype() if name == "auto" else DTYPES[name]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _rebuild_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the checkpoint: build them for real."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                _set_module(model, name, type(module)(config=config))


def load_quantized(model_dir: Path, backend: ModuleType, dtype: torch.dtype, graph: bool = False) -> nn.Module:
    """The quantized model on the backend's device: no float copy of the integer weights is built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from npuflow.formats import QuantizedWeight, read_quantized

    qm = json.loads((model_dir / "quant_manifest.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dev = backend.device()
    sd: dict[str, torch.Tensor] = {}
    # On the CPU the weights stay where they are read: read them into the process's own memory, not as views
    # of the files' mappings, whose pages stay resident while any tensor of the file lives, those prepare
    # replaces (fused, repacked) included (1B W8A16, bf16, fused projections: peak RSS 2173 MiB mapped).
    tensors = read_quantized(model_dir, qm["format"], mapped=dev.type != "cpu")
    for name in list(tensors):  # each released once on the device (a dtype cast frees its source at once)
        t = tensors.pop(name)
        if not isinstance(t, QuantizedWeight):
            sd[name] = t.to(dev, dtype) if t.is_floating_point() else t.to(dev)
            continue
        path, prefix = name.removesuffix(".weight"), name.removesuffix("weight")
        old = model.get_submodule(path)
        if isinstance(old, nn.Embedding):
            if t.bits != 8:
                raise NpuflowError(f"{path}: only 8-bit embeddings are supported; keep it in float (ignore)")
            _set_module(model, path, W8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx))
            sd[name], sd[prefix + "weight_scale"] = t.qweight.to(dev), t.scale.to(dev, dtype)
            continue
        _set_module(model, path, QuantLinear(old.in_features, old.out_features, old.bias is not None, t.bits,
                                             t.group_size, backend, t.act))
        sd[prefix + "qweight"] = t.qweight.to(dev)
        sd[prefix + "scale"] = t.scale.to(dev, torch.float32 if t.act else dtype)  # W8A8 dequantizes in float32
        if t.act == "tensor":
            sd[prefix + "input_scale"], sd[prefix + "input_offset"] = t.act_scale.to(dev), t.act_offset.to(dev)
        if t.zero is not None:
            sd[prefix + "zero"] = t.zero.to(dev, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    sd.clear()  # the model holds the tensors now: prepare's fusions and repacks free the ones they replace
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise NpuflowError(
            f"{model_dir} does not match its config.json: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        model.tie_weights()
    _rebuild_meta_buffers(model, config, dev)
    model.eval()
    model = backend.prepare(model, graph=graph)
    release_freed_heap()
    return model


def release_freed_heap() -> None:
    """Give the heap that loading freed (read chunks, dtype casts, the weights prepare fused or repacked) back
    to the OS: glibc keeps freed chunks below the top of its heap mapped, which counts in the RSS (measured
    on a TP=2 rank of the 1B W8A16 model: ~37 MiB after reading, ~70 MiB more after fusing the projections).
    No-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_reference(model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The unquantized model as published (the quality reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def stop_token_ids(eos_token_id, tokenizer) -> frozenset[int]:
    """The ids that end a completion: the model config's eos_token_id (an id or a list) and the tokenizer's."""
    ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return frozenset(i for i in [*ids, tokenizer.eos_token_id] if i is not None)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
