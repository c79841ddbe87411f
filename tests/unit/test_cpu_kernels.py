"""npuflow's C++ CPU kernels (npuflow/runtime/cpu_kernels.cpp) against the pure-torch paths they replace."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from npuflow.runtime import cpu_kernels
from npuflow.runtime.backends import cpu
from npuflow.runtime.backends.common import linear_w8a16_reference
from npuflow.runtime.engine import KV_BUCKET, _single_query, decode_attention

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"CPU kernels: {cpu_kernels.problem()}")


def _blocks(nb: int, slots: int, kvh: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(nb, slots, kvh, KV_BUCKET, d, generator=g).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,heads,kvh", [(1, 16, 16), (3, 8, 2), (4, 6, 2)])
def test_decode_attention_equals_the_torch_reference_on_cache_blocks(dtype, rows, heads, kvh) -> None:
    keys, values = _blocks(3, 4, kvh, 64, dtype, seed=rows)
    k, v = keys[:, :rows], values[:, :rows]  # a slot range: strided views, as SlotCache.update hands them over
    q = torch.randn(rows, heads, 1, 64, generator=torch.Generator().manual_seed(9)).to(dtype)
    lengths = torch.tensor([300, 5, 383, 130])[:rows]
    mask = torch.arange(3 * KV_BUCKET)[None, None, None, :] <= lengths[:, None, None, None]
    got = torch.ops.npuflow_cpu.decode_attention(q, k, v, mask, 0.125)
    want = _single_query(q.float(), k.float(), v.float(), mask, 0.125)  # float32 throughout
    assert got.dtype == dtype and got.shape == (rows, 1, heads, 64)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_decode_attention_through_the_hf_interface_takes_4d_keys_and_a_shared_mask() -> None:
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 4, 200, 32, generator=g), torch.randn(2, 4, 200, 32, generator=g)  # (B, kvh, L, D)
    q = torch.randn(2, 8, 1, 32, generator=g)
    mask = (torch.arange(200) % 3 != 0)[None, None, None, :]  # (1, 1, 1, L): the same for every row
    got, _ = decode_attention(None, q, k, v, mask, scaling=0.2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             attn_mask=mask, scale=0.2).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_attention_gives_zeros_for_a_row_that_attends_nothing() -> None:
    keys, values = _blocks(1, 2, 2, 16, torch.float32, seed=3)
    q = torch.randn(2, 2, 1, 16)
    mask = torch.zeros(2, 1, 1, KV_BUCKET, dtype=torch.bool)
    mask[1, ..., :10] = True
    got = torch.ops.npuflow_cpu.decode_attention(q, keys, values, mask, 0.25)
    assert torch.equal(got[0], torch.zeros(1, 2, 16))
    torch.testing.assert_close(got[1:], _single_query(q[1:], keys[:, 1:], values[:, 1:], mask[1:], 0.25))


def test_decode_attention_refuses_mismatched_inputs_with_a_clear_error() -> None:
    keys, values = _blocks(1, 2, 2, 16, torch.float32, seed=4)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.npuflow_cpu.decode_attention(torch.randn(2, 2, 1, 16), keys, values,
                                               torch.zeros(2, 1, 1, KV_BUCKET), 0.25)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.npuflow_cpu.decode_attention(torch.randn(2, 2, 1, 16).bfloat16(), keys, values,
                                               torch.ones(2, 1, 1, KV_BUCKET, dtype=torch.bool), 0.25)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("out_f,in_f", [(96, 64), (97, 100), (256, 1024), (12, 2816)])
def test_int8_linear_equals_the_reference(rows: int, out_f: int, in_f: int) -> None:
    g = torch.Generator().manual_seed(rows * out_f)
    q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=g)
    scale = torch.rand(out_f, generator=g) * 0.01 + 1e-3
    x = torch.randn(rows, in_f, generator=g)
    want = linear_w8a16_reference(x.double(), q, scale.double())  # exact up to float64
    got = torch.ops.npuflow_cpu.int8_linear(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, out_f)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    got16 = torch.ops.npuflow_cpu.int8_linear(x.bfloat16(), q, scale.bfloat16())
    ref16 = linear_w8a16_reference(x.bfloat16().double(), q, scale.bfloat16().double())
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), ref16, atol=1e-2 * ref16.abs().max().item(), rtol=1e-2)


def test_int8_linear_reads_a_weight_with_a_row_stride() -> None:
    q = torch.randint(-128, 128, (64, 160), dtype=torch.int8)[:, :128]  # rows 160 bytes apart
    x, scale = torch.randn(2, 128), torch.rand(64)
    torch.testing.assert_close(torch.ops.npuflow_cpu.int8_linear(x, q, scale), linear_w8a16_reference(x, q, scale),
                               atol=1e-3, rtol=1e-4)


def test_int8_linear_refuses_a_float_weight() -> None:
    with pytest.raises(RuntimeError, match="w must be int8"):
        torch.ops.npuflow_cpu.int8_linear(torch.randn(1, 8), torch.randn(4, 8), torch.ones(4))


def test_the_cpu_backend_runs_decode_rows_on_the_kernel_and_records_it() -> None:
    q = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    scale, x = torch.rand(32) * 0.01, torch.randn(1, 1, 64)
    y = cpu.linear_w8a16(x, q, scale)
    assert y.shape == (1, 1, 32)
    torch.testing.assert_close(y, torch.ops.npuflow_cpu.int8_linear(x.reshape(1, 64), q, scale).reshape(1, 1, 32))
    kernels = cpu.kernels(torch.bfloat16)
    assert "npuflow_cpu::int8_linear" in kernels["linear_w8a16"]
    assert "npuflow_cpu::decode_attention" in kernels["attention"]


def test_compiled_code_calls_the_kernels_as_opaque_ops() -> None:
    keys, values = _blocks(2, 2, 2, 32, torch.bfloat16, seed=5)
    q = torch.randn(2, 4, 1, 32).bfloat16()
    mask = torch.ones(2, 1, 1, 2 * KV_BUCKET, dtype=torch.bool)
    w, scale = torch.randint(-128, 128, (48, 128), dtype=torch.int8), torch.rand(48) * 0.01

    def step(q, k, v, m):
        a = torch.ops.npuflow_cpu.decode_attention(q, k, v, m, 0.2)  # (2, 1, 4, 32)
        return torch.ops.npuflow_cpu.int8_linear(a.reshape(2, 128), w, scale)

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(q, keys, values, mask), step(q, keys, values, mask))


def test_turned_off_the_backend_keeps_its_torch_paths() -> None:
    code = ("import torch; from npuflow.runtime import cpu_kernels; from npuflow.runtime.backends import cpu; "
            "print(cpu_kernels.problem()); print(cpu.kernels(torch.bfloat16)['attention'])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NPUFLOW_CPU_KERNELS": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert "turned off (NPUFLOW_CPU_KERNELS=0)" in out and "npuflow::single_query_attention" in out


def _int4_weight(out_f: int, in_f: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8, generator=g)
    scale = torch.rand(out_f, in_f // group, generator=g) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (out_f, in_f // group), generator=g).float()
    scales = torch.stack([scale, scale * zero], dim=-1).to(torch.bfloat16).contiguous()
    return q, scale, zero, scales


int4 = pytest.mark.skipif(not cpu.npuflow_int4_ok(64, 64), reason="npuflow's int4 kernel needs AVX512-BF16")


@int4
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9])
def test_int4_linear_equals_the_reference(group: int, rows: int) -> None:
    from npuflow.runtime.backends.common import linear_w4a16_reference

    q, _, _, scales = _int4_weight(97, 256, group, seed=rows + group)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
    s, sz = scales[..., 0].double(), scales[..., 1].double()  # the kernel's own (bf16) scales, exactly
    want = linear_w4a16_reference(x.double(), q, s, sz / s, group)
    got = torch.ops.npuflow_cpu.int4_linear(x, cpu.pack_int4(q), scales, group)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 97)
    torch.testing.assert_close(got.double(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)


@int4
@pytest.mark.parametrize("group", [32, 128])
def test_int4_dequantize_gives_the_weight_the_kernel_multiplies_by(group: int) -> None:
    q, _, _, scales = _int4_weight(40, 256, group, seed=group)
    w = torch.ops.npuflow_cpu.int4_dequantize(cpu.pack_int4(q), scales, group)
    s, sz = (scales[..., i].float().repeat_interleave(group, dim=1) for i in (0, 1))
    torch.testing.assert_close(w.float(), (q.float() * s - sz).bfloat16().float(), atol=0, rtol=0)
    x = torch.randn(3, 256).bfloat16()
    kernel = torch.ops.npuflow_cpu.int4_linear(x, cpu.pack_int4(q), scales, group).float()
    torch.testing.assert_close((x @ w.t()).float(), kernel, atol=2e-2 * kernel.abs().max().item(), rtol=2e-2)


@int4
def test_int4_linear_refuses_a_group_it_cannot_split() -> None:
    q, _, _, scales = _int4_weight(8, 192, 96, seed=1)
    with pytest.raises(RuntimeError, match="multiple of 64 and of the group size"):
        torch.ops.npuflow_cpu.int4_linear(torch.randn(1, 192).bfloat16(), cpu.pack_int4(q), scales, 96)
    assert not cpu.npuflow_int4_ok(96, 192)  # the backend keeps aten's kernel for such a layer
