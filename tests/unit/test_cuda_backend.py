"""CUDA backend on a real GPU (skipped without one): kernels against the references, the quantized model
against the CPU, the compiled engine against its eager reference, the device's clock and memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu, cuda
from npuflow.runtime.backends.common import linear_w8a16_reference
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import load_quantized
from npuflow.runtime.scheduler import generate

pytestmark = pytest.mark.gpu


def test_cuda_int8_kernel_matches_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=gen)
    scale = torch.rand(96, generator=gen) * 0.02 + 1e-3
    for rows in (1, 4, 33):
        x = torch.randn(rows, 64, generator=gen)
        ref = linear_w8a16_reference(x, q, scale)
        y = cuda.linear_w8a16(x.cuda().bfloat16(), q.cuda(), scale.cuda())  # aten._weight_int8pack_mm
        torch.testing.assert_close(y.float().cpu(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_quantized_model_on_cuda_tracks_the_cpu(tiny_model_dir: Path, tmp_path: Path, scheme: str) -> None:
    out = tmp_path / scheme
    out.mkdir()
    quantize_dir(tiny_model_dir, out, QuantizationConfig(scheme=scheme, group_size=32 if scheme == "w4a16" else None))
    ids = torch.arange(32).unsqueeze(0) * 7 % 500  # (1, T)
    with torch.inference_mode():
        ref = load_quantized(out, cpu, torch.float32)(ids).logits
        got = load_quantized(out, cuda, torch.bfloat16)(ids.cuda()).logits.float().cpu()
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95


def test_compiled_decode_on_cuda_matches_its_eager_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    quantize_dir(tiny_model_dir, out, QuantizationConfig())
    model = load_quantized(out, cuda, torch.bfloat16)
    prompt = (torch.arange(24) * 13 % 500).unsqueeze(0).cuda()
    eager = generate(Engine(model, max_len=96), prompt, 48)
    compiled = generate(Engine(model, max_len=96, compile=True), prompt, 48)
    assert torch.equal(compiled, eager)


def test_cuda_clock_and_memory() -> None:
    cuda.reset_peak_memory()
    t0 = cuda.now_ms()
    x = torch.ones(64 * 2**20 // 4, device="cuda")  # 64 MiB
    (x * 2).sum().item()
    assert cuda.now_ms() > t0
    assert cuda.peak_memory_mb() >= 64
    assert cuda.default_dtype() == torch.bfloat16 and "cuda" in cuda.versions()
