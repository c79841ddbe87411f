"""Format compressed-tensors: the compressed-tensors package and transformers read our output back.

Our writer never calls the library; these tests use compressed-tensors 0.20.0 to read the files
(CompressedTensorsDequantizer, its model-free reader), to compress the same integers its own way and compare
bit for bit (PackedQuantizationCompressor), and to parse quantization_config (its pydantic models).
The shapes vLLM expects come from vLLM's CompressedTensorsWNA16.create_weights
(vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from compressed_tensors.quantization import QuantizationConfig as CTQuantizationConfig
from safetensors.torch import load_file

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError
from npuflow.formats import QuantizedWeight, read_quantized
from npuflow.formats.compressed_tensors import read
from npuflow.quant.primitives import quantize_group_asym, quantize_per_channel_int8
from npuflow.quant.streaming import quantize_dir

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = {"w8a16": ("w8a16", None), "w4a16-g32": ("w4a16", 32), "w4a16-g64": ("w4a16", 64)}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _is_linear(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in LINEARS and name.endswith(".weight")


def _quantize(src: Path, out: Path, **cfg) -> dict:
    out.mkdir(parents=True)
    return quantize_dir(src, out, QuantizationConfig(format="compressed-tensors", **cfg))


def _bound(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Round-to-nearest error bound (out, in): half a step, scale (out, 1) or (out, in // g) widened to in."""
    return scale.float().repeat_interleave(in_features // scale.shape[1], dim=1) / 2 * (1 + 1e-5) + 1e-12


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> tuple[str, int | None]:
    return CASES[request.param]


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory, tiny_random_llama_dir: Path, case) -> Path:
    scheme, group_size = case
    out = tmp_path_factory.mktemp("ct") / scheme
    _quantize(tiny_random_llama_dir, out, scheme=scheme, group_size=group_size)
    return out


# ---------------------------------------------------------------------------------------------- library


def test_library_dequantizes_to_the_original_within_bound(ct_dir: Path, tiny_random_llama_dir: Path) -> None:
    original, files = _tensors(tiny_random_llama_dir), _tensors(ct_dir)
    # validate() = process() plus: every targeted module had all its params, no quantization param is left
    deq = CompressedTensorsDequantizer(ct_dir, dtype=torch.float32).validate(dict(files))
    ours = read(ct_dir)
    assert set(deq) == set(original)
    for name, w in original.items():
        if not _is_linear(name):  # norms, embed_tokens, lm_head: stored as they were
            assert deq[name].dtype == w.dtype and torch.equal(deq[name], w), name
            continue
        scale = files[name.removesuffix("weight") + "weight_scale"]
        assert torch.all((deq[name] - w).abs() <= _bound(scale, w.shape[1])), name
        torch.testing.assert_close(deq[name], ours[name].dequantize(), rtol=0, atol=1e-7)


def test_packing_is_bit_identical_to_the_library_compressor(ct_dir: Path, tiny_random_llama_dir: Path) -> None:
    config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    scheme = CTQuantizationConfig.model_validate(config).config_groups["group_0"]
    original, files = _tensors(tiny_random_llama_dir), _tensors(ct_dir)
    for name in filter(_is_linear, original):
        prefix = name.removesuffix("weight")
        state = {"weight": original[name], "weight_scale": files[prefix + "weight_scale"]}
        if not scheme.weights.symmetric:  # the library's zero point before packing: signed int8, z - 8
            qw = quantize_group_asym(original[name], 4, scheme.weights.group_size)
            state["weight_zero_point"] = (qw.zero - 8).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        assert set(theirs) == {k.removeprefix(prefix) for k in files if k.startswith(prefix)}, name
        for key, t in theirs.items():
            assert t.dtype == files[prefix + key].dtype and torch.equal(t, files[prefix + key]), (name, key)


def test_quantization_config_parses_and_lists_float_layers(ct_dir: Path, case) -> None:
    from transformers import CompressedTensorsConfig

    scheme, group_size = case
    config = json.loads((ct_dir / "config.json").read_text())
    qc = CTQuantizationConfig.model_validate(config["quantization_config"])
    assert (qc.quant_method, qc.format, qc.quantization_status) == ("compressed-tensors", "pack-quantized", "compressed")
    assert list(qc.config_groups) == ["group_0"]
    group = qc.config_groups["group_0"]
    assert group.targets == ["Linear"] and group.input_activations is None and group.output_activations is None
    w = group.weights
    expected = (8, True, "channel", None) if scheme == "w8a16" else (4, False, "group", group_size)
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (
        expected[0], "int", expected[1], expected[2], expected[3])
    assert qc.ignore == ["lm_head", "model.embed_tokens"]  # kept float: they are in the file as float
    files = _tensors(ct_dir)
    assert files["lm_head.weight"].is_floating_point() and files["model.embed_tokens.weight"].is_floating_point()
    hf = CompressedTensorsConfig.from_dict(config)  # what transformers builds from config.json
    assert hf.quantization_config.config_groups["group_0"].weights == w


def test_tensors_have_the_shapes_vllm_creates(ct_dir: Path, tiny_random_llama_dir: Path) -> None:
    config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    w = config["config_groups"]["group_0"]["weights"]
    pack = 32 // w["num_bits"]  # values per int32
    files = _tensors(ct_dir)
    for name, t in _tensors(tiny_random_llama_dir).items():
        if not _is_linear(name):
            continue
        out_f, in_f = t.shape
        groups = 1 if w["group_size"] is None else in_f // w["group_size"]  # channel: group_size = in
        # CompressedTensorsWNA16.create_weights, one HF shard (vLLM loads each into its rows of a fused layer)
        expected = {"weight_packed": ((out_f, in_f // pack), torch.int32), "weight_shape": ((2,), torch.int64),
                    "weight_scale": ((out_f, groups), torch.float32)}  # the loader casts to the model dtype
        if not w["symmetric"]:
            expected["weight_zero_point"] = ((out_f // pack, groups), torch.int32)
        prefix = name.removesuffix("weight")
        assert {k.removeprefix(prefix) for k in files if k.startswith(prefix)} == set(expected), name
        for key, (shape, dtype) in expected.items():
            assert (tuple(files[prefix + key].shape), files[prefix + key].dtype) == (shape, dtype), (name, key)
        assert files[prefix + "weight_shape"].tolist() == [out_f, in_f]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_transformers_loads_it(ct_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(ct_dir, quantization_config=CompressedTensorsConfig(dequantize=True))
    finally:
        hf_logging.enable_progress_bar()
    state, ours = model.state_dict(), read(ct_dir)
    for name, t in ours.items():
        expected = t.dequantize() if isinstance(t, QuantizedWeight) else t
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- ours


def test_read_gives_back_what_quantize_produced(ct_dir: Path, tiny_random_llama_dir: Path, case) -> None:
    scheme, group_size = case
    original = _tensors(tiny_random_llama_dir)
    got, via_registry = read(ct_dir), read_quantized(ct_dir, "compressed-tensors")
    assert set(got) == set(original) == set(via_registry)
    for name, w in original.items():
        t = got[name]
        if not _is_linear(name):
            assert torch.equal(t, w), name
            continue
        if scheme == "w8a16":
            q, scale = quantize_per_channel_int8(w)
            ref = QuantizedWeight(q, scale, None, 8, None)
        else:
            ref = quantize_group_asym(w, 4, group_size)
        assert isinstance(t, QuantizedWeight) and (t.bits, t.group_size) == (ref.bits, ref.group_size), name
        assert t.qweight.dtype == ref.qweight.dtype and torch.equal(t.qweight, ref.qweight), name
        assert torch.equal(t.scale, ref.scale), name
        assert (t.zero is None and ref.zero is None) or torch.equal(t.zero, ref.zero), name
        assert torch.equal(via_registry[name].dequantize(), t.dequantize()), name


def test_sharded_source_keeps_its_shards_and_index(tiny_random_llama_sharded_dir: Path, tmp_path: Path,
                                                   tiny_random_llama_dir: Path) -> None:
    out = tmp_path / "out"
    manifest = _quantize(tiny_random_llama_sharded_dir, out, scheme="w4a16", group_size=32)
    shards = sorted(p.name for p in tiny_random_llama_sharded_dir.glob("*.safetensors"))
    assert sorted(manifest["files"]) == sorted(p.name for p in out.glob("*.safetensors")) == shards
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {name: f.name for f in out.glob("*.safetensors") for name in load_file(f)}
    deq = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(_tensors(out))
    single = tmp_path / "single"
    _quantize(tiny_random_llama_dir, single, scheme="w4a16", group_size=32)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == json.loads(
        (single / "config.json").read_text())["quantization_config"]
    expected = read(single)
    for name, t in expected.items():
        torch.testing.assert_close(deq[name], t.dequantize() if isinstance(t, QuantizedWeight) else t,
                                   rtol=0, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kept_float", ["lm_head", "model.embed_tokens"])
def test_quantized_head_or_embedding_is_refused(tiny_random_llama_dir: Path, tmp_path: Path, kept_float: str) -> None:
    # vLLM applies compressed-tensors to LinearBase layers only; lm_head and embed_tokens are embeddings there
    quantized = "model.embed_tokens" if kept_float == "lm_head" else "lm_head"
    with pytest.raises(ValueError, match=rf"keep {re.escape(quantized)} in quantization\.ignore"):  # config
        _quantize(tiny_random_llama_dir, tmp_path / "out", ignore=(kept_float,))


def test_part_of_a_fused_layer_in_float_is_refused(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    ignore = ("model.embed_tokens", "lm_head", "model.layers.0.mlp.up_proj")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.gate_up_proj \(gate_proj: int, up_proj: float\)"):
        _quantize(tiny_random_llama_dir, tmp_path / "out", scheme="w4a16", group_size=32, ignore=ignore)


def test_whole_fused_group_in_float_is_listed_in_ignore(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ignore = ("model.embed_tokens", "lm_head", "model.layers.1.self_attn.[qkv]_proj")
    _quantize(tiny_random_llama_dir, out, scheme="w4a16", group_size=64, ignore=ignore)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.embed_tokens", "model.layers.1.self_attn.k_proj",
                            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    deq = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(_tensors(out))
    original = _tensors(tiny_random_llama_dir)
    assert torch.equal(deq["model.layers.1.self_attn.k_proj.weight"], original["model.layers.1.self_attn.k_proj.weight"])
