"""W8A8 deployables (issue 12): msmodelslim read the way vllm-ascend builds its parameters, compressed-tensors
int-quantized as vLLM parses it, the NPU linear on the torch_npu references, the engine table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from npuflow.core.engines import engine_problem
from npuflow.formats import read_quantized
from npuflow.runtime.backends import cpu, npu, npu_ops
from tests.unit.conftest import TINY_LLAMA, _quiet_transformers
from tests.unit.test_w8a8 import _make_outlier_llama, _quantize

LINEAR_TENSORS = {  # vllm-ascend: the parameters each scheme creates per linear (get_weight / get_*_param)
    "W8A8": ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "weight_scale", "weight_offset"),
    "W8A8_DYNAMIC": ("weight", "weight_scale", "weight_offset"),
}


def _source(tmp_path_factory, dtype: torch.dtype) -> Path:
    out = tmp_path_factory.mktemp(f"outlier-{str(dtype)[6:]}") / "m"
    with _quiet_transformers():
        _make_outlier_llama().to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    return _source(tmp_path_factory, torch.bfloat16)


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    return _source(tmp_path_factory, torch.float16)


def _vllm_ascend_params(kind: str, out_f: int, in_f: int, params_dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (shape, dtype) as AscendW8A8LinearMethod / AscendW8A8DynamicLinearMethod create them
    (vllm_ascend/quantization/methods/w8a8_static.py, w8a8_dynamic.py @ 182b75e)."""
    params = {"weight": ((out_f, in_f), torch.int8), "weight_scale": ((out_f, 1), params_dtype),
              "weight_offset": ((out_f, 1), params_dtype)}
    if kind == "W8A8":
        deq = torch.float32 if params_dtype == torch.bfloat16 else torch.int64
        params |= {"input_scale": ((1,), params_dtype), "input_offset": ((1,), torch.int8),
                   "quant_bias": ((out_f,), torch.int32), "deq_scale": ((out_f,), deq)}
    return params


def _file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = model_dir.glob("quant_model_weight_*.safetensors")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _loaded_like_vllm_ascend(model_dir: Path, params_dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Every quantized linear's parameters, built as vllm-ascend builds them and filled from the files with its
    weight loader's copy (same shape required, the dtype converted into the parameter's)."""
    description = json.loads((model_dir / "quant_model_description.json").read_text())
    tensors = _file_tensors(model_dir)
    assert set(tensors) <= set(description)  # the description names every tensor
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, kind in description.items():
        if not name.endswith(".weight") or kind not in LINEAR_TENSORS:
            continue
        prefix = name.removesuffix("weight")
        out_f, in_f = tensors[name].shape
        expected = _vllm_ascend_params(kind, out_f, in_f, params_dtype)
        assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == set(LINEAR_TENSORS[kind])
        layer = {}
        for local, (shape, dtype) in expected.items():
            t = tensors[prefix + local]
            assert tuple(t.shape) == shape, (prefix + local, t.shape, shape)
            assert description[prefix + local] == kind
            if local == "deq_scale":
                assert t.dtype == dtype  # no conversion on load: the bits themselves are the contract
            if local in ("weight", "quant_bias"):
                assert t.dtype == dtype
            param = torch.empty(shape, dtype=dtype)
            param.copy_(t)
            layer[local] = param
        layers[prefix] = layer
    return layers


def _ascend_static_apply(layer: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """AscendW8A8LinearMethod.process_weights_after_loading + apply on the torch_npu references."""
    scale = layer["input_scale"].repeat(x.shape[-1])
    xq = npu_ops.npu_quantize(x, 1 / scale, layer["input_offset"].repeat(x.shape[-1]).to(scale.dtype),
                              torch.qint8, -1, False)
    return npu_ops.npu_quant_matmul(xq, layer["weight"].T.contiguous(), layer["deq_scale"], bias=layer["quant_bias"],
                                    output_dtype=x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_msmodelslim_w8a8_loads_as_vllm_ascend_builds_it(dtype, bf16_dir, fp16_dir, tmp_path: Path) -> None:
    src = bf16_dir if dtype == torch.bfloat16 else fp16_dir
    out = tmp_path / "q"
    _quantize(src, out, "w8a8", 0.5, "msmodelslim")
    assert (out / "quant_model_weight_w8a8.safetensors").is_file()
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A8" and description["version"] == "1.0.0"
    assert description["model.layers.0.input_layernorm.weight"] == "FLOAT"  # smoothed, stays float
    assert description["model.layers.0.mlp.down_proj.weight"] == "FLOAT"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    layers = _loaded_like_vllm_ascend(out, dtype)
    assert len(layers) == 6 * TINY_LLAMA["num_hidden_layers"]  # q, k, v, o, gate, up
    ours = read_quantized(out, "msmodelslim")
    g = torch.Generator().manual_seed(0)
    for prefix, layer in layers.items():
        x = (torch.randn(5, layer["weight"].shape[1], generator=g) * 3).to(dtype)
        want = cpu.linear_w8a8(x.float(), *_qw_args(ours[prefix + "weight"])).float()
        got = _ascend_static_apply(layer, x).float()
        assert ((got - want).norm() / want.norm()).item() < 0.01, prefix
    for p in ("model.layers.0.self_attn.", "model.layers.1.mlp."):  # a fused group's shards share one input range
        members = ("q_proj", "k_proj", "v_proj") if "attn" in p else ("gate_proj", "up_proj")
        assert len({float(layers[f"{p}{m}."]["input_scale"]) for m in members}) == 1
        assert len({int(layers[f"{p}{m}."]["input_offset"]) for m in members}) == 1


def _qw_args(qw) -> tuple:
    return qw.qweight, qw.scale, qw.act_scale, qw.act_offset


def test_msmodelslim_w8a8_dynamic_loads_as_vllm_ascend_builds_it(bf16_dir, tmp_path: Path) -> None:
    out = tmp_path / "q"
    _quantize(bf16_dir, out, "w8a8-dynamic", 0.5, "msmodelslim")
    assert (out / "quant_model_weight_w8a8_dynamic.safetensors").is_file()
    assert json.loads((out / "quant_model_description.json").read_text())["model_quant_type"] == "W8A8_DYNAMIC"
    layers = _loaded_like_vllm_ascend(out, torch.bfloat16)
    ours = read_quantized(out, "msmodelslim")
    for prefix, layer in layers.items():  # AscendW8A8DynamicLinearMethod.apply on the references
        x = torch.randn(4, layer["weight"].shape[1]).to(torch.bfloat16)
        xq, xs = npu_ops.npu_dynamic_quant(x)
        got = npu_ops.npu_quant_matmul(xq, layer["weight"].T.contiguous(), layer["weight_scale"].flatten(),
                                       pertoken_scale=xs, output_dtype=torch.bfloat16).float()
        want = cpu.linear_w8a8(x.float(), ours[prefix + "weight"].qweight, ours[prefix + "weight"].scale).float()
        assert ((got - want).norm() / want.norm()).item() < 0.01, prefix


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-dynamic"])
def test_compressed_tensors_int_quantized_as_vllm_parses_it(scheme: str, tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    src = tmp_path / "src"
    with _quiet_transformers():
        _make_outlier_llama().to(torch.bfloat16).save_pretrained(src)
    out = tmp_path / "q"
    _quantize(src, out, scheme, 0.5, "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = CTConfig.model_validate(qc)  # the library vLLM parses it with
    group = next(iter(parsed.config_groups.values()))
    w, a = group.weights, group.input_activations
    assert qc["format"] == "int-quantized" and w.num_bits == 8 and w.symmetric and w.strategy == "channel"
    assert (a.strategy, a.dynamic, a.symmetric) == (("token", True, True) if scheme == "w8a8-dynamic"
                                                    else ("tensor", False, False))
    assert "model.layers.0.mlp.down_proj" in qc["ignore"]
    tensors = {}
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            tensors |= {k: h.get_tensor(k) for k in h.keys()}
    p = "model.layers.0.self_attn.q_proj."  # CompressedTensorsW8A8Int8.create_weights' shapes and dtypes
    assert tensors[p + "weight"].dtype == torch.int8 and tensors[p + "weight_scale"].shape == (64, 1)
    if scheme == "w8a8":
        assert tensors[p + "input_scale"].shape == (1,) and tensors[p + "input_zero_point"].dtype == torch.int8
    else:
        assert p + "input_scale" not in tensors
    native = tmp_path / "n"
    _quantize(src, native, scheme, 0.5, "native")
    a_ct, a_nat = read_quantized(out, "compressed-tensors"), read_quantized(native, "native")
    qw, qn = a_ct[p + "weight"], a_nat[p + "weight"]
    assert torch.equal(qw.qweight, qn.qweight) and torch.equal(qw.scale, qn.scale) and qw.act == qn.act


@pytest.mark.parametrize("static", [False, True])
def test_npu_w8a8_linear_on_the_references_is_the_cpu_linear(static: bool, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", npu_ops)  # the backend's torch_npu calls run the references
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 7, 128, generator=g) + 0.2).to(torch.bfloat16)
    w = torch.randn(48, 128, generator=g) * 0.02
    from npuflow.quant.schemes import W8A8

    qw = W8A8().quantize(w)
    args = (torch.tensor([0.02]), torch.tensor([-9.0])) if static else (None, None)
    got = npu.linear_w8a8(x, qw.qweight, qw.scale, *args).float()
    want = cpu.linear_w8a8(x, qw.qweight, qw.scale, *args).float()
    assert got.shape == (2, 7, 48) and ((got - want).norm() / want.norm()).item() < 0.01


def test_engine_table_names_the_w8a8_pairs() -> None:
    assert engine_problem("vllm", "cpu", "w8a8-dynamic", "compressed-tensors") is None
    assert engine_problem("vllm", "cpu", "w8a8", "compressed-tensors") is None
    assert engine_problem("vllm", "npu", "w8a8", "msmodelslim") is None
    assert engine_problem("vllm", "npu", "w8a8-dynamic", "msmodelslim") is None
    why = engine_problem("vllm", "cpu", "w8a16", "compressed-tensors")
    assert "no W8A16 kernel" in why and "quantization {scheme: w8a8-dynamic, format: compressed-tensors}" in why
    assert "w8a8" in engine_problem("vllm", "npu", "w8a8", "compressed-tensors")
