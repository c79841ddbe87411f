"""CPU backend: aten int8 weight-only matmul for decode (dequantized for prefill), aten int4 packed matmul."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from npuflow.runtime import cpu_kernels
from npuflow.runtime.backends.common import (
    library_versions,
    linear_w4a16_reference,
    linear_w8a16_reference,
    prepare_with_inductor,
    quantize_per_token_int8,
    quantize_static_int8,
)

NAME = "cpu"
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")  # package energy counter, microjoules


def unavailable() -> str | None:
    return None


def device() -> torch.device:
    return torch.device("cpu")


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def default_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively (AVX512-BF16 or AMX: oneDNN says so), else float32:
    emulated bf16 is slower than float32, and the int8 decode kernel wants bf16 activations."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


# Up to this many rows (a decode step's) a W8A16 product reads the int8 weight as it is. npuflow's kernel,
# one decode step's linears of the 220M benchmark Llama (48 + an int8 lm_head, 187 MB, weights from memory,
# 2 threads; benchmarks/cpu_runtime.py times the whole step): 1 row 3.8-5.9 ms vs aten's
# _weight_int8pack_mm 6.0-7.2 ms, 2 rows 6.0 vs 8.4-9.1, 4 rows 9.5-10 vs 7-9.3.
DECODE_ROWS = 4
DEQUANT_CHUNK = 4 << 20  # weight elements dequantized at a time for a prefill-sized W8A16 product (8 MiB bf16)


def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Decode-sized inputs (<= DECODE_ROWS rows) use npuflow's int8 kernel (cpu_kernels.cpp: any float dtype),
    or aten's for bf16 where it could not be built; everything else dequantizes, a block of output rows at a
    time (DEQUANT_CHUNK elements), so the float copy of a large weight (fused gate/up of a 1B model: 46 MiB in
    bf16, two temporaries before) never exists whole; the same GEMMs, fewer bytes."""
    rows, (out_f, in_f) = x.numel() // x.shape[-1], qweight.shape
    if rows <= DECODE_ROWS and cpu_kernels.available():
        y = torch.ops.npuflow_cpu.int8_linear(x.reshape(rows, in_f), qweight, scale)
        return y.reshape(*x.shape[:-1], out_f)
    if x.dtype == torch.bfloat16 and rows <= DECODE_ROWS:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, in_f), qweight, scale.to(x.dtype))
        return y.reshape(*x.shape[:-1], out_f)
    step = max(1, DEQUANT_CHUNK // in_f)
    if step >= out_f:
        return linear_w8a16_reference(x, qweight, scale)
    x2, s = x.reshape(rows, in_f), scale.to(x.dtype)
    parts = [x2 @ qweight[a : a + step].to(x.dtype).mul_(s[a : a + step, None]).t()  # (rows, step) each
             for a in range(0, out_f, step)]
    return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], out_f)


linear_w4a16 = linear_w4a16_reference  # float32 activations; bf16 models get Int4PackedLinear (prepare)


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                input_offset: torch.Tensor | None = None, wsum: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 on oneDNN's int8 GEMM (aten._int_mm: int8 x int8 -> int32, VNNI/AMX where the CPU has them).

    x (..., in) is quantized per token (input_scale None) or with the static scale/offset; qweight int8
    (out, in), scale (out,); wsum (out,) int32 = qweight.sum(1), needed for a static offset:
    (x_q - o) @ q.T = x_q @ q.T - o * wsum. Same result as linear_w8a8_reference (integer sums are exact).
    """
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if input_scale is None:
        xq, xs = quantize_per_token_int8(x2)  # (rows, in) int8, (rows, 1)
        acc = torch._int_mm(xq, qweight.t())  # (rows, out) int32
    else:
        xq, xs = quantize_static_int8(x2, input_scale, input_offset), input_scale.float()
        acc = torch._int_mm(xq, qweight.t())
        if wsum is None:
            wsum = qweight.sum(dim=1, dtype=torch.int32)
        acc = acc - input_offset.to(torch.int32) * wsum[None, :]
    y = acc.float().mul_(xs).mul_(scale.float()[None, :])
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


# From this many rows on (prefill), a 4-bit linear dequantizes to bf16 and runs oneDNN's GEMM. Measured on
# the 220M benchmark Llama, 2 threads, whole prefill forward, int4 kernel vs dequantized: 50 rows 131 vs
# 253 ms, 100: 240 vs 303, 200: 452 vs 400-434, 500: 1261 vs 733-808 (unpacking costs ~2.4 ms a weight).
DEQUANT_ROWS = 160
# The same crossover for npuflow_cpu::int4_linear (it reads the weight once per 4 rows) against its C++
# dequantization: 12 linears of the 220M Llama, kernel vs dequantized + GEMM, ms: 1 row 0.8 vs 7.2, 16: 7.1
# vs 9.8, 24: 10.1 vs 9.7, 64: 27.6 vs 14.2 (2 threads, best of 3).
OWN_INT4_DEQUANT_ROWS = 24


def _unpack_int4_t(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W.T (in, out) in bf16 from aten's CPU int4 layout: packed (out, in // 2) uint8 holds blocks of 64
    output rows as [in, 32] bytes, the low nibble for rows 0-31 of the block, the high one for rows 32-63
    (checked against the kernel at first use, see `int4_layout_ok`); w = (q - 8) * scale + zero_f."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    b = packed.view(out_f // 64, in_f, 32).permute(1, 0, 2)  # (in, out / 64, 32)
    q = torch.stack([b & 15, b >> 4], dim=2).reshape(in_f // group_size, group_size, out_f)
    s, z = scales_zeros[:, None, :, 0], scales_zeros[:, None, :, 1]  # (groups, 1, out)
    return torch.addcmul(z - 8 * s, q.to(torch.bfloat16), s).view(in_f, out_f)


_LAYOUT_OK: bool | None = None


def _unpacker(unpack):
    """The unpacking compiled by inductor (one fused loop per weight shape, 2-3x eager's speed) where a C++
    compiler is installed; eager torch ops otherwise."""
    import shutil

    if any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return torch.compile(unpack, dynamic=False)
    return unpack


def int4_layout_ok() -> bool:
    """Whether `_unpack_int4_t` reads this build's int4 layout (the kernel packs per CPU capability):
    a random weight through both paths, once per process."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(0, 16, (128, 256), dtype=torch.int32, generator=g)
        sz = (torch.rand(2, 128, 2, generator=g) + 0.5).to(torch.bfloat16)
        x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1)
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz).float()
        got = (x @ _unpack_int4_t(packed, sz, 128)).float()
        _LAYOUT_OK = bool(((got - want).abs().max() <= 0.02 * want.abs().max()).item())
    return _LAYOUT_OK


def npuflow_int4_ok(group_size: int, in_features: int) -> bool:
    """Whether npuflow_cpu::int4_linear runs natively here (AVX512-BF16) for this shape."""
    return (cpu_kernels.available() and torch.ops.npuflow_cpu.simd() == "avx512_bf16" and in_features % 64 == 0
            and (group_size == 32 or group_size % 64 == 0) and in_features % group_size == 0)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) 4-bit values -> (out, in // 2) uint8 in npuflow_cpu::int4_linear's layout: per 64 inputs, 32
    bytes with q[0..31] in the low nibbles and q[32..63] in the high ones."""
    b = q.to(torch.uint8).view(q.shape[0], -1, 2, 32)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


class Int4PackedLinear(torch.nn.Module):
    """4-bit weights two per byte (half the bytes of the loaded uint8 values), bf16 activations.

    Decode-sized inputs run a 4-bit kernel that reads the packed weight as it is; from `dequant_rows` rows on
    (prefill) the weight is dequantized to bf16 for the step and multiplied by oneDNN's GEMM. The kernel is
    npuflow's (npuflow_cpu::int4_linear, `pack_int4` layout) on AVX512-BF16 hosts, else aten's
    _weight_int4pack_mm_for_cpu, whose cost grows linearly with the rows: a 500-token prefill dequantized
    took 0.6x its time, measured here. aten computes w = (q - 8) * scale + zero_f per group; npuflow stores
    w = (q - zero) * scale, so zero_f = (8 - zero) * scale.
    """

    def __init__(self, q: torch.nn.Module):
        super().__init__()
        self.in_features, self.out_features, self.group_size = q.in_features, q.out_features, q.group_size
        s, z = q.scale.float(), q.zero.float()  # (out, groups)
        self.own = npuflow_int4_ok(self.group_size, self.in_features)
        if self.own:
            self.register_buffer("packed", pack_int4(q.qweight))  # (out, in // 2) uint8
            self.register_buffer("scales", torch.stack([s, s * z], dim=-1).to(torch.bfloat16).contiguous())
            self.dequant_rows = OWN_INT4_DEQUANT_ROWS
            self.unpack = torch.ops.npuflow_cpu.int4_dequantize
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.qweight.to(torch.int32), 1)
            self.register_buffer("packed", packed)  # (out, in // 2) uint8, aten's layout
            self.register_buffer("scales", torch.stack([s.T, ((8 - z) * s).T], dim=-1).contiguous()
                                 .to(torch.bfloat16))  # (groups, out, 2)
            self.dequant_rows = DEQUANT_ROWS if self.out_features % 64 == 0 and int4_layout_ok() else None
            self.unpack = _unpacker(_unpack_int4_t)
        self.bias = None if q.bias is None else torch.nn.Parameter(q.bias.detach().to(torch.bfloat16),
                                                                   requires_grad=False)

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        """The 4-bit kernel on x2 (rows, in) bf16 -> (rows, out), whatever the rows."""
        if self.own:
            return torch.ops.npuflow_cpu.int4_linear(x2, self.packed, self.scales, self.group_size)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales)

    def dequantized(self) -> torch.Tensor:
        """The weight in bf16, (out, in)."""
        w = self.unpack(self.packed, self.scales, self.group_size)
        return w if self.own else w.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) bf16 -> (..., out)
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        if self.dequant_rows is not None and rows >= self.dequant_rows:
            y = torch.nn.functional.linear(x2, self.dequantized())
        else:
            y = self.kernel(x2)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def int4_packable(module: torch.nn.Module) -> bool:
    from npuflow.runtime.loader import QuantLinear

    return (isinstance(module, QuantLinear) and module.bits == 4 and module.group_size in (32, 64, 128, 256)
            and module.out_features % 16 == 0 and module.in_features % 2 == 0)


def fuse_linears(parts: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One QuantLinear computing the given ones side by side (their outputs concatenated), or None when they
    cannot share one kernel call (not all quantized alike, or static activation scales that differ)."""
    from npuflow.runtime.loader import QuantLinear

    first = parts[0]
    if not all(isinstance(p, QuantLinear) and (p.bits, p.group_size, p.act, p.in_features, p.bias is None)
               == (first.bits, first.group_size, first.act, first.in_features, first.bias is None) for p in parts):
        return None
    if first.act == "tensor" and not all(torch.equal(p.input_scale, first.input_scale)
                                         and torch.equal(p.input_offset, first.input_offset) for p in parts):
        return None
    out = sum(p.out_features for p in parts)
    fused = QuantLinear(first.in_features, out, first.bias is not None, first.bits, first.group_size, first.backend,
                        first.act)
    for name in ("qweight", "scale", "zero"):
        if getattr(first, name) is not None:
            setattr(fused, name, torch.cat([getattr(p, name) for p in parts]))
    if first.act == "tensor":
        fused.input_scale, fused.input_offset = first.input_scale, first.input_offset
    if first.bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class FusedQKVAttention(LlamaAttention):
    """LlamaAttention with q, k and v projected by one kernel call (`qkv`, outputs [q | k | v])."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.qkv(hidden_states).split(self.qkv_sizes, dim=-1)
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query_states, key_states, value_states, attention_mask, dropout=0.0,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class FusedGateUpMLP(LlamaMLP):
    """LlamaMLP with gate and up projected by one kernel call (`gate_up`, outputs [gate | up])."""

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.gate_up_sizes, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


# module class -> (fused linear's name, the linears it replaces, the re-classed module)
FUSED = {LlamaAttention: ("qkv", ("q_proj", "k_proj", "v_proj"), FusedQKVAttention),
         LlamaMLP: ("gate_up", ("gate_proj", "up_proj"), FusedGateUpMLP)}


def fuse_projections(model: torch.nn.Module) -> int:
    """q/k/v and gate/up of every decoder layer into one quantized linear each (one weight read per group in
    a decode step instead of three and two: fewer, larger kernel calls), in place; returns the groups fused.
    The modules are re-classed, so the attention interface, the cache and the hooks are HF's own. Only the
    attention and MLP modules are listed up front: each group's separate linears are freed as soon as it is
    fused (a list of every module would keep them all alive to the end, +2/3 of the weights at peak)."""
    from npuflow.runtime.loader import release_freed_heap

    n = 0
    for module in [m for m in model.modules() if type(m) in FUSED]:
        name, parts, cls = FUSED[type(module)]
        fused = fuse_linears([getattr(module, p) for p in parts])
        if fused is None:
            continue
        setattr(module, f"{name}_sizes", [getattr(module, p).out_features for p in parts])
        for p in parts:
            delattr(module, p)
        setattr(module, name, fused)
        module.__class__ = cls
        n += 1
        release_freed_heap()  # the separate linears' memory back to the OS before the next group's copy
    return n


def prepare(model: torch.nn.Module, graph: bool = False) -> torch.nn.Module:
    """bf16 models: q/k/v and gate/up fused into one quantized linear each, then 4-bit linears moved to the
    packed int4 kernel; then HF modules as they are (SDPA attention), graph mode compiled with inductor.
    npuflow's C++ kernels are built (once per host) and loaded here, before any tracing."""
    cpu_kernels.problem()
    if model.dtype == torch.bfloat16:
        fuse_projections(model)
        for name in [n for n, m in model.named_modules() if int4_packable(m)]:  # names: each old one freed at once
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4PackedLinear(model.get_submodule(name)))
    return prepare_with_inductor(model, graph)


def kernels(dtype: torch.dtype) -> dict[str, str]:
    """The kernel each operation runs on this host, as the deployable records it (the C++ kernels where they
    build here, else why not)."""
    why = cpu_kernels.problem()
    own = why is None
    w8a8 = {"linear_w8a8": "aten._int_mm (oneDNN int8 GEMM), activations int8 per token or static per tensor"}
    decode = (f"npuflow_cpu::int8_linear (<= {DECODE_ROWS} rows)" if own else
              f"aten._weight_int8pack_mm (<= {DECODE_ROWS} rows; npuflow's kernel unavailable: {why})"
              if dtype == torch.bfloat16 else "")
    attention = ("sdpa (prefill) / " + ("npuflow_cpu::decode_attention (C++, one query per row over the cache "
                                        "blocks)" if own else "npuflow::single_query_attention (bmm)"))
    common = w8a8 | {"attention": attention}
    if own:
        common["cpu_kernels"] = "built here from cpu_kernels.cpp (-O3 -march=native)"
    if dtype == torch.bfloat16:
        return common | {"projections": "q/k/v and gate/up fused: one quantized linear each (fuse_projections)",
                         "linear_w8a16": f"{decode} / dequantized F.linear (prefill)",
                         "linear_w4a16": f"aten._weight_int4pack_mm_for_cpu (< {DEQUANT_ROWS} rows) / "
                                         "dequantized bf16 GEMM (prefill)"}
    return common | {"linear_w8a16": f"{decode} / dequantized F.linear" if own else "dequantized F.linear",
                     "linear_w4a16": "dequantized F.linear"}


def synchronize() -> None:
    pass


def now_ms() -> float:
    return time.perf_counter() * 1e3


def reset_peak_memory() -> None:
    """Start the peak over from the current resident set (Linux: "5" to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process lifetime


def peak_memory_mb() -> float:
    """Peak resident set size of this process since start or the last reset (the whole serving process on
    a CPU). VmHWM, not getrusage's ru_maxrss: that one survives fork + exec, so a child started by a big
    parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def energy_joules() -> float | None:
    try:
        return int(RAPL.read_text()) / 1e6
    except (OSError, ValueError):
        return None


def energy_unavailable() -> str:
    return f"not measured: RAPL counter {RAPL} is not readable on this machine"


def versions() -> dict[str, str]:
    return library_versions()
