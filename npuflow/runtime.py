"""Model runtime: load a quantized artifact onto a device with the backend's kernels, and the float reference."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from torch import nn

from npuflow.errors import NpuflowError

log = logging.getLogger("npuflow.runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class W8A16Linear(nn.Module):
    """y = x @ (qweight * scale).T + bias, computed by the device's weight-only int8 kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: Kernel):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("weight_scale", torch.empty(out_features, device="meta"))  # (out,)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        y = self.kernel(x, self.weight, self.weight_scale)
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


def _read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                sd[name] = f.get_tensor(name)
    return sd


def _rebuild_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the checkpoint: build them for real."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                _set_module(model, name, type(module)(config=config))


def load_quantized(model_dir: Path, backend: ModuleType, dtype: torch.dtype, graph: bool = False) -> nn.Module:
    """The quantized model on the backend's device: no float copy of the weights is ever built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qm = json.loads((model_dir / "quant_manifest.json").read_text())
    if qm["scheme"] != "w8a16":
        raise NpuflowError(f"the runtime has no kernel for scheme {qm['scheme']!r} yet; supported: w8a16")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    kernel = backend.linear_w8a16
    for name, t in qm["tensors"].items():
        if not t["quantized"]:
            continue
        path = name.removesuffix(".weight")
        old = model.get_submodule(path)
        if isinstance(old, nn.Embedding):
            _set_module(model, path, W8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx))
        else:
            _set_module(model, path, W8A16Linear(old.in_features, old.out_features, old.bias is not None, kernel))
    dev = backend.device()
    sd = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in _read_state_dict(model_dir).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
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
    if graph:
        model.forward = torch.compile(model.forward, dynamic=True)
    return model


def load_reference(model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The unquantized model as published (the quality reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
