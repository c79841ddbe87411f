"""W8A8 (issue 12): the int8 GEMM linear, SmoothQuant calibration one layer at a time, the runtime end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.formats import read_quantized, read_tensors
from npuflow.quant.schemes import W8A8, get_handler
from npuflow.quant.smoothquant import default_float_layers, smoothing_factors, smoothquant_calibrate
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import common, cpu
from npuflow.runtime.loader import QuantLinear, load_quantized, load_reference
from tests.unit.conftest import TINY_LLAMA, _make_tiny_llama, _quiet_transformers

OUTLIERS = (5, 40)  # input channels whose activations are 40x the rest (the norm weights carry them)


def _make_outlier_llama() -> torch.nn.Module:
    """The tiny random Llama with a few outlier channels in every RMSNorm weight, as trained LLMs have."""
    model = _make_tiny_llama(seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(OUTLIERS)] = 40.0
    return model


@pytest.fixture(scope="module")
def outlier_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outlier-llama") / "m"
    with _quiet_transformers():
        _make_outlier_llama().save_pretrained(out)
    return out


def _windows(samples: int = 8, seq_len: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY_LLAMA["vocab_size"], (samples, seq_len), generator=g)  # (S, T) token ids


def _quantize(src: Path, out: Path, scheme: str, alpha: float | None, fmt: str = "native") -> dict:
    cfg = QuantizationConfig(scheme=scheme, format=fmt, smoothquant_alpha=alpha)
    floats = default_float_layers(TINY_LLAMA["num_hidden_layers"])
    result = smoothquant_calibrate(src, get_handler(cfg), (*cfg.ignore, *floats), _windows(), out.parent / "work",
                                   alpha)
    out.mkdir(parents=True)
    return quantize_dir(src, out, cfg, precomputed=result, float_layers=floats)


def _logits(model_dir: Path, quantized: bool) -> torch.Tensor:
    model = load_quantized(model_dir, cpu, torch.float32) if quantized else load_reference(model_dir, torch.device("cpu"))
    with torch.inference_mode():
        return model(_windows(2, 24)).logits  # (2, 24, vocab)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_int8_gemm_linear_is_the_reference_and_close_to_float(static: bool, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g) + 0.3  # (rows, in), not centred: the static offset matters
    w = torch.randn(96, 256, generator=g) * 0.05  # (out, in)
    qw = W8A8().quantize(w)
    scale, offset = (torch.tensor([float(x.max() - x.min()) / 255]),
                     torch.tensor([round(-128 - float(x.min()) / (float(x.max() - x.min()) / 255))], dtype=torch.float32)) \
        if static else (None, None)
    fast = cpu.linear_w8a8(x, qw.qweight, qw.scale, scale, offset)
    ref = common.linear_w8a8_reference(x, qw.qweight, qw.scale, scale, offset)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)
    exact = x @ w.T
    err = ((fast - exact).norm() / exact.norm()).item()
    assert 0 < err < 0.02, err


def test_smoothing_factor_is_the_papers_formula() -> None:
    x_max, w_max = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(x_max, w_max, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))  # sqrt(4) / sqrt(1), sqrt(1) / sqrt(4)
    assert s[2] == 1 and s[3] == 1  # a channel that never fires or has no weight: nothing to migrate
    assert torch.allclose(smoothing_factors(x_max[:2], w_max[:2], 1.0), x_max[:2])


def test_smoothquant_folds_into_the_norms_one_vector_per_fused_group(outlier_llama_dir: Path, tmp_path: Path) -> None:
    _quantize(outlier_llama_dir, tmp_path / "q", "w8a8", 0.5)
    got, src = read_quantized(tmp_path / "q", "native"), read_tensors(outlier_llama_dir)
    for i in range(TINY_LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, members in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g_old, g_new = src[f"{p}{norm}.weight"], got[f"{p}{norm}.weight"]
            s = g_old / g_new  # (in,) the smoothing vector
            assert s[list(OUTLIERS)].min() > 3 * s.median()  # the outlier channels moved into the weights
            for m in members:  # every member of the group scaled by the same s: the float product is unchanged
                w_hat = got[f"{p}{m}.weight"].dequantize()
                w = src[f"{p}{m}.weight"].float()
                assert ((w_hat / s[None, :] - w).norm() / w.norm()).item() < 0.05
                assert got[f"{p}{m}.weight"].act == "tensor"
                assert got[f"{p}{m}.weight"].act_scale.shape == (1,)
            scales = {float(got[f"{p}{m}.weight"].act_scale) for m in members}
            assert len(scales) == 1  # one input, one activation range for the fused group
        assert not hasattr(got[f"{p}mlp.down_proj.weight"], "qweight")  # down_proj stays float (msModelSlim default)
        assert got[f"{p}self_attn.o_proj.weight"].act == "tensor"  # o_proj: W8A8, not smoothed


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-dynamic"])
def test_smoothquant_beats_plain_w8a8_on_outlier_activations(scheme: str, outlier_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    ref = _logits(outlier_llama_dir, quantized=False)
    errs = {}
    for alpha in (0.5, None):
        out = tmp_path / f"{alpha}" / "q"
        qm = _quantize(outlier_llama_dir, out, scheme, alpha)
        assert qm["scheme"] == scheme
        assert "model.layers.0.mlp.down_proj" in qm["float_layers"]
        errs[alpha] = ((_logits(out, quantized=True) - ref).norm() / ref.norm()).item()
    assert errs[0.5] < 0.7 * errs[None], errs


def test_runtime_uses_the_int8_linear(outlier_llama_dir: Path, tmp_path: Path) -> None:
    _quantize(outlier_llama_dir, tmp_path / "q", "w8a8-dynamic", 0.5)
    model = load_quantized(tmp_path / "q", cpu, torch.float32)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, QuantLinear) and q.act == "token" and q.scale.dtype == torch.float32
    manifest = json.loads((tmp_path / "q" / "quant_manifest.json").read_text())
    assert manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "int8"


def test_w8a8_config_refusals_name_the_fix() -> None:
    with pytest.raises(ValueError, match="supported method: rtn"):
        QuantizationConfig(scheme="w8a8", method="gptq")
    with pytest.raises(ValueError, match=r"keep lm_head in quantization\.ignore"):
        QuantizationConfig(scheme="w8a8-dynamic", ignore=("model.embed_tokens",))
    with pytest.raises(ValueError, match="group_size applies to w4a16 only"):
        QuantizationConfig(scheme="w8a8", group_size=64)
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        QuantizationConfig(scheme="w8a8", smoothquant_alpha=1.5)
    for extra in ({"sensitivity": True}, {"fallback": "auto"}):  # weight-only measures: refused, not ignored
        with pytest.raises(ValueError, match=r"not offered for it; keep layers float by name in quantization\.ignore"):
            QuantizationConfig(scheme="w8a8-dynamic", **extra)


def test_w8a8_needs_real_calibration_text_before_any_work(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    from npuflow.core.errors import NpuflowError
    from npuflow.quant.model import quantize_model

    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(NpuflowError, match=r"scheme w8a8 \(SmoothQuant\).*builtin:tiny-corpus-train"):
        quantize_model(tiny_random_llama_dir, out, QuantizationConfig(scheme="w8a8"))
    assert not any(out.iterdir())
