"""Runtime and backends: the quantized model tracks the float one; device selection fails early and clearly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError, DeviceUnavailableError
from npuflow.quant.primitives import dequantize_per_channel_int8, quantize_per_channel_int8
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu, get_backend
from npuflow.runtime.backends.common import linear_w8a16_reference
from npuflow.runtime.loader import QuantLinear, W8Embedding, load_quantized, load_reference


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))  # (B, T)


@pytest.fixture(scope="module")
def reference_logits(tiny_random_llama_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    ref = load_reference(tiny_random_llama_dir, torch.device("cpu"))
    with torch.inference_mode():
        return ref(input_ids).logits  # (B, T, V)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def _assert_close_to_reference(logits: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (logits - ref).abs().max().item()
    scale = ref.abs().max().item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert 0 < diff <= 0.05 * scale, (diff, scale)  # > 0: the weights really are int8
    assert agree >= 0.9, agree


# ---------------------------------------------------------------------------------------------- load_quantized


def test_reference_is_the_saved_model(reference_logits: torch.Tensor, tiny_random_llama, input_ids) -> None:
    torch.testing.assert_close(reference_logits, _logits(tiny_random_llama, input_ids))


def test_load_quantized_tracks_the_float_model(quantized_llama_dir: Path, reference_logits, input_ids) -> None:
    model = load_quantized(quantized_llama_dir, cpu, torch.float32)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantLinear) and attn.q_proj.qweight.dtype == torch.int8
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8  # the native default: int8
    assert type(model.model.embed_tokens) is nn.Embedding  # ignored: float
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])  # everything materialised
    assert not model.training
    _assert_close_to_reference(_logits(model, input_ids), reference_logits)


def test_load_quantized_with_embeddings_and_head_quantized(
    tiny_random_llama_dir: Path, tmp_path: Path, reference_logits, input_ids
) -> None:
    out = tmp_path / "q"
    out.mkdir()
    quantize_dir(tiny_random_llama_dir, out, QuantizationConfig(ignore=()))
    model = load_quantized(out, cpu, torch.float32)
    assert isinstance(model.model.embed_tokens, W8Embedding)
    assert isinstance(model.lm_head, QuantLinear)
    _assert_close_to_reference(_logits(model, input_ids), reference_logits)


def test_load_quantized_sharded_equals_single_file(
    quantized_llama_dir: Path, tiny_random_llama_sharded_dir: Path, tmp_path: Path, input_ids
) -> None:
    out = tmp_path / "q"
    out.mkdir()
    quantize_dir(tiny_random_llama_sharded_dir, out, QuantizationConfig())
    sharded = _logits(load_quantized(out, cpu, torch.float32), input_ids)
    torch.testing.assert_close(sharded, _logits(load_quantized(quantized_llama_dir, cpu, torch.float32), input_ids))


def test_load_quantized_bf16_decode_step(quantized_llama_dir: Path, input_ids) -> None:
    """bf16 with one row per linear takes the aten int8 kernel on CPU; it must agree with fp32."""
    ids = input_ids[:1, :1]  # (1, 1): a decode-sized step
    fp32 = _logits(load_quantized(quantized_llama_dir, cpu, torch.float32), ids)
    model = load_quantized(quantized_llama_dir, cpu, torch.bfloat16)
    assert model.model.layers[0].self_attn.qkv.scale.dtype == torch.bfloat16  # q/k/v fused (cpu.prepare)
    bf16 = _logits(model, ids)
    assert (bf16 - fp32).abs().max().item() <= 0.05 * fp32.abs().max().item()


# ---------------------------------------------------------------------------------------------- backends


def test_get_backend_cpu() -> None:
    backend = get_backend("cpu")
    assert backend is cpu and backend.device() == torch.device("cpu")
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert backend.default_dtype() == (torch.bfloat16 if native_bf16 else torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_get_backend_npu_unavailable_names_the_fix() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"device 'npu' is not available here: torch_npu .*CANN") as info:
        get_backend("npu")
    assert info.value.exit_code == 2
    assert "pip install 'npuflow[npu]'" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_get_backend_cuda_unavailable() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"device 'cuda' is not available here: .*torch") as info:
        get_backend("cuda")
    assert info.value.exit_code == 2


def test_get_backend_unknown_device_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown device 'tpu'; valid: cpu, cuda, npu") as info:
        get_backend("tpu")
    assert info.value.exit_code == 2


# ---------------------------------------------------------------------------------------------- kernels


@pytest.fixture(scope="module")
def int8_weight() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w (96, 64) fp32, q int8, scale (96,)) from a random weight."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    q, scale = quantize_per_channel_int8(w)
    return w, q, scale


def test_linear_w8a16_reference_matches_dequantized_linear(int8_weight) -> None:
    _, q, scale = int8_weight
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))  # (B, T, in)
    y = linear_w8a16_reference(x, q, scale)
    assert y.shape == (2, 3, 96)
    torch.testing.assert_close(y, F.linear(x, dequantize_per_channel_int8(q, scale)))


@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (4, 64)], ids=["2d-1row", "3d-1row", "4rows"])
def test_cpu_linear_w8a16_bf16_decode_matches_reference(int8_weight, shape: tuple[int, ...]) -> None:
    _, q, scale = int8_weight
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    y = cpu.linear_w8a16(x.bfloat16(), q, scale)  # aten._weight_int8pack_mm
    assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 96)
    ref = linear_w8a16_reference(x, q, scale)  # fp32
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_cpu_linear_w8a16_fp32_is_the_reference(int8_weight) -> None:
    _, q, scale = int8_weight
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(cpu.linear_w8a16(x, q, scale), linear_w8a16_reference(x, q, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_w8a16_prefill_dequantizes_blocks_of_rows_with_the_same_result(
        int8_weight, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill-sized product dequantizes DEQUANT_CHUNK weight elements at a time (the whole float weight
    never exists): bit-equal to dequantizing it whole, also when the last block is short."""
    _, q, scale = int8_weight  # (96, 64)
    monkeypatch.setattr(cpu, "DEQUANT_CHUNK", 64 * 40)  # blocks of 40 output rows: 40, 40, 16
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    assert torch.equal(cpu.linear_w8a16(x, q, scale), linear_w8a16_reference(x, q, scale))


def test_cpu_weights_are_read_into_the_process_memory_not_the_file_mapping(quantized_llama_dir: Path) -> None:
    """On the CPU load_quantized reads tensors with file reads (formats.read_tensors(mapped=False)): the same
    values as safe_open's views, but in the process's own memory, so a weight prepare replaces is freed."""
    from npuflow.formats import read_tensors

    mapped, own = read_tensors(quantized_llama_dir), read_tensors(quantized_llama_dir, mapped=False)
    assert mapped.keys() == own.keys()
    for k, t in mapped.items():
        assert own[k].dtype == t.dtype and torch.equal(own[k], t), k


def test_w8a16_linear_module_adds_bias(int8_weight) -> None:
    _, q, scale = int8_weight
    layer = QuantLinear(64, 96, bias=True, bits=8, group_size=None, backend=cpu)
    bias = torch.randn(96)
    layer.load_state_dict({"qweight": q, "scale": scale, "bias": bias}, assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, dequantize_per_channel_int8(q, scale), bias))


def test_w4a16_model_tracks_the_float_model(tiny_random_llama_dir: Path, tmp_path: Path, reference_logits,
                                            input_ids) -> None:
    out = tmp_path / "q4"
    out.mkdir()
    quantize_dir(tiny_random_llama_dir, out, QuantizationConfig(scheme="w4a16", group_size=32))
    model = load_quantized(out, cpu, torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bits == 4 and q.scale.shape == (64, 2)  # (out, in // 32)
    assert int(q.qweight.max()) <= 15
    logits = _logits(model, input_ids)
    # int4 is coarser than int8, yet the model must still follow the float one
    err = (logits - reference_logits).abs().max() / reference_logits.abs().max()
    assert 0 < err < 0.25


@pytest.mark.parametrize("rows", [1, 4, 37])  # decode, a small batch, a prefill
def test_cpu_int4_packed_linear_matches_the_dequantized_reference(rows: int) -> None:
    gen = torch.Generator().manual_seed(7)
    layer = QuantLinear(128, 96, bias=True, bits=4, group_size=32, backend=cpu)
    q = torch.randint(0, 16, (96, 128), dtype=torch.uint8, generator=gen)
    scale, zero = torch.rand(96, 4, generator=gen) + 0.05, torch.randint(0, 16, (96, 4), generator=gen).float()
    layer.load_state_dict({"qweight": q, "scale": scale, "zero": zero, "bias": torch.randn(96, generator=gen)},
                          assign=True)
    assert cpu.int4_packable(layer)
    packed = cpu.Int4PackedLinear(layer)
    assert packed.packed.numel() == q.numel() // 2  # two 4-bit values per byte
    x = torch.randn(rows, 128, generator=gen)
    ref = layer(x)  # float32: the dequantized reference
    y = packed(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_bf16_w4a16_model_runs_the_packed_int4_kernel(tiny_random_llama_dir: Path, tmp_path: Path,
                                                      input_ids) -> None:
    out = tmp_path / "q4"
    out.mkdir()
    quantize_dir(tiny_random_llama_dir, out, QuantizationConfig(scheme="w4a16", group_size=32))
    fp32 = _logits(load_quantized(out, cpu, torch.float32), input_ids)
    model = load_quantized(out, cpu, torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.down_proj, cpu.Int4PackedLinear)
    bf16 = _logits(model, input_ids)
    assert (bf16 - fp32).abs().max().item() <= 0.05 * fp32.abs().max().item()


def test_cpu_peak_memory_sees_a_spike_and_resets() -> None:
    cpu.reset_peak_memory()  # whatever ran before in this process
    before = cpu.peak_memory_mb()
    spike = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    spike.sum()
    assert cpu.peak_memory_mb() >= before + 200
    del spike
    cpu.reset_peak_memory()
    assert cpu.peak_memory_mb() < before + 100  # back near the live set, not the lifetime high


def test_cpu_peak_memory_of_a_child_is_its_own(tmp_path: Path) -> None:
    """A child started by a big parent reports its own peak (getrusage's ru_maxrss would report the parent's)."""
    import subprocess
    import sys

    ballast = torch.ones(512 * 2**20 // 4)  # the parent holds 512 MiB while the child runs
    ballast.sum()
    code = "from npuflow.runtime.backends import cpu; print(cpu.peak_memory_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < cpu.peak_memory_mb() - 256
    del ballast
