"""Tensor parallelism for the quantized runtime: Megatron-style sharding of a loaded model (RowParallel).

Each rank holds 1/N of every decoder linear. q/k/v/gate/up are column-parallel (each rank computes
1/N of the output features: whole attention heads, whole kv heads, 1/N of the MLP's hidden units);
o/down are row-parallel (each rank multiplies its 1/N of the input features and an all_reduce sums
the partial outputs). Two all-reduces per layer. shard_llama keeps embeddings, norms and lm_head whole;
the rank-local loader splits the embedding and lm_head by vocabulary rows (shard_load.py). Every
collective goes through `timed` (the benchmark's communication share of TPOT).

transformers 5.x LlamaAttention reshapes q/k/v with `-1` heads and keeps `num_key_value_groups =
heads / kv_heads`, which is the same on every rank when both head counts split evenly: no per-rank
attribute needs changing.

Each rank reads only its own slices from the checkpoint (runtime/shard_load.load_rank_local, the same
split as shard_llama); pipeline stages are in runtime/pipeline.py. Run it with
`npuflow benchmark MODEL_DIR --mode tensor-parallel --tp N` (which calls npuflow.bench.parallel.launch), or directly:
  torchrun --standalone --nproc-per-node N -m npuflow.bench.parallel MODEL_DIR cpu float32 CONFIG_JSON OUT
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from npuflow.core.errors import NpuflowError

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # device -> torch.distributed backend
COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


class CommClock:
    """Seconds this process spends inside its collectives and point-to-point calls (all_reduce, all_gather,
    send, recv, broadcast), counted only while `on` (the benchmark turns it on for its timed runs). `sync`:
    the backend's synchronize, called around each call on accelerators, whose collectives are asynchronous
    (the time then is the collective's own, not the compute queued before it); None on the CPU (gloo's calls
    return when done). The time includes waiting for the slowest peer, as a profiler's would."""

    def __init__(self) -> None:
        self.on, self.seconds, self.calls = False, 0.0, 0
        self.sync: Callable[[], None] | None = None


COMM = CommClock()


def timed(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), its wall time added to COMM when COMM.on."""
    if not COMM.on:
        return fn(*args, **kwargs)
    if COMM.sync is not None:
        COMM.sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    if COMM.sync is not None:
        COMM.sync()
    COMM.seconds += time.perf_counter() - t
    COMM.calls += 1
    return out


class RowParallel(nn.Module):
    """A linear whose input features are split over the ranks: partial products summed by all_reduce.

    The bias is added once, after the sum (on every rank, so every rank holds the full output).
    """

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.inner, self.group = inner, group
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in / N) -> (..., out)
        y = self.inner(x)
        timed(dist.all_reduce, y, group=self.group)
        return y + self.bias if self.bias is not None else y


def _part(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous 1/world slice of t along dim (a copy: the full tensor can be freed)."""
    if t.shape[dim] % world:
        raise NpuflowError(f"cannot split a dimension of {t.shape[dim]} over {world} ranks")
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).clone()


def shard_column(linear: nn.Module, rank: int, world: int) -> nn.Module:
    """Keep this rank's output rows: qweight, scale, zero (QuantLinear) or weight (nn.Linear), and bias."""
    from npuflow.runtime.loader import QuantLinear

    if isinstance(linear, QuantLinear):
        linear.qweight = _part(linear.qweight, 0, rank, world)  # (out/N, in)
        linear.scale = _part(linear.scale, 0, rank, world)  # (out/N,) or (out/N, groups)
        if linear.zero is not None:
            linear.zero = _part(linear.zero, 0, rank, world)  # (out/N, groups)
        linear.out_features //= world
    elif isinstance(linear, nn.Linear):
        linear.weight = nn.Parameter(_part(linear.weight.data, 0, rank, world), requires_grad=False)
        linear.out_features //= world
    else:
        raise NpuflowError(f"cannot shard a {type(linear).__name__}; valid: QuantLinear, nn.Linear")
    if linear.bias is not None:
        linear.bias = nn.Parameter(_part(linear.bias.data, 0, rank, world), requires_grad=False)
    return linear


def shard_row(linear: nn.Module, rank: int, world: int, group=None) -> RowParallel:
    """Keep this rank's input columns; 4-bit: whole groups (scale and zero split along groups)."""
    from npuflow.runtime.loader import QuantLinear

    bias = linear.bias.data if linear.bias is not None else None
    linear.bias = None
    if isinstance(linear, QuantLinear):
        if linear.group_size and (linear.in_features // world) % linear.group_size:
            raise NpuflowError(
                f"{linear.in_features} input features over {world} ranks do not split into whole groups of "
                f"{linear.group_size}; use fewer ranks or a smaller group_size"
            )
        linear.qweight = _part(linear.qweight, 1, rank, world)  # (out, in/N)
        if linear.group_size:  # per-channel 8-bit scales (out,) apply to every column: unchanged
            linear.scale = _part(linear.scale, 1, rank, world)  # (out, groups/N)
            if linear.zero is not None:
                linear.zero = _part(linear.zero, 1, rank, world)
        linear.in_features //= world
    elif isinstance(linear, nn.Linear):
        linear.weight = nn.Parameter(_part(linear.weight.data, 1, rank, world), requires_grad=False)
        linear.in_features //= world
    else:
        raise NpuflowError(f"cannot shard a {type(linear).__name__}; valid: QuantLinear, nn.Linear")
    return RowParallel(linear, bias, group)


def shard_llama(model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Shard a loaded Llama in place for `rank` of `world`; checks that heads and MLP split evenly."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    ffn = cfg.intermediate_size
    for what, n in (("attention heads", heads), ("kv heads", kv_heads), ("intermediate_size", ffn)):
        if n % world:
            raise NpuflowError(f"{what} = {n} do not split over {world} ranks; choose tp dividing {n}")
    for layer in model.model.layers:
        for path in COLUMN:
            parent, _, child = path.rpartition(".")
            shard_column(getattr(layer.get_submodule(parent), child), rank, world)
        for path in ROW:
            parent, _, child = path.rpartition(".")
            module = layer.get_submodule(parent)
            setattr(module, child, shard_row(getattr(module, child), rank, world, group))
    return model
