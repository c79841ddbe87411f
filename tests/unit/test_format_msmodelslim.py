"""Format msmodelslim: the output loads the way vllm-ascend loads it, and reads back to what quantize produced.

The vllm-ascend loader is re-enacted here from its source (vllm-project/vllm-ascend @ 182b75e):
vllm_ascend/quantization/modelslim_config.py (per-layer type lookup in quant_model_description.json),
method_adapters.py (AscendLinearMethod.create_weights: parameters sharded along output_dim 0) and
methods/w8a16.py (AscendW8A16LinearMethod: parameter names, dtypes, shapes, and the kernel's dequantization).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.formats import QuantizedWeight, read_quantized
from npuflow.formats.msmodelslim import read
from npuflow.quant.primitives import quantize_per_channel_int8
from npuflow.quant.streaming import quantize_dir

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM's LlamaForCausalLM: the linear layers it builds, HF shards of each (packed_modules_mapping)
VLLM_LINEARS = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",),
}
HEADER = {"model_quant_type", "version", "group_size"}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _quantize(src: Path, out: Path, **cfg) -> dict:
    out.mkdir(parents=True)
    return quantize_dir(src, out, QuantizationConfig(format="msmodelslim", **cfg))


@pytest.fixture(scope="module", params=["single", "sharded"])
def source_dir(request) -> Path:
    """The float checkpoint: one model.safetensors, or 100 KB shards with an index."""
    return request.getfixturevalue("tiny_random_llama_dir" if request.param == "single" else
                                   "tiny_random_llama_sharded_dir")


@pytest.fixture(scope="module")
def w8a16_dir(tmp_path_factory: pytest.TempPathFactory, source_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("msmodelslim") / "w8a16"
    _quantize(source_dir, out)
    return out


# ---------------------------------------------------------------------------------------------- vllm-ascend


def w8a16_params(input_size: int, output_size: int, params_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """AscendW8A16LinearMethod.get_weight + get_perchannel_param (methods/w8a16.py)."""
    return {
        "weight": torch.empty(output_size, input_size, dtype=torch.int8),
        "weight_scale": torch.empty(output_size, 1, dtype=params_dtype),
        "weight_offset": torch.empty(output_size, 1, dtype=params_dtype),
    }


def load_like_vllm_ascend(model_dir: Path) -> dict[str, torch.Tensor]:
    """The float32 (out, in) weight each vLLM linear layer computes with, loaded as vllm-ascend does."""
    description = json.loads((model_dir / "quant_model_description.json").read_text())
    hf = json.loads((model_dir / "config.json").read_text())
    params_dtype = getattr(torch, hf.get("dtype") or hf.get("torch_dtype") or "float32")  # the model dtype
    files = _tensors(model_dir)
    layers: dict[str, torch.Tensor] = {}
    for i in range(hf["num_hidden_layers"]):
        for module, shards in VLLM_LINEARS.items():
            prefixes = [f"model.layers.{i}.{module.split('.')[0]}.{s}" for s in shards]
            # modelslim_config.py get_linear_quant_type: each shard's "<prefix>.weight" type, all the same
            kinds = {description[p + ".weight"] for p in prefixes}
            assert kinds == {"W8A16"}, (module, kinds)
            rows = [files[p + ".weight"].shape[0] for p in prefixes]
            params = w8a16_params(files[prefixes[0] + ".weight"].shape[1], sum(rows), params_dtype)
            start = 0
            for p, n in zip(prefixes, rows, strict=True):
                for name, param in params.items():  # weight_loader: each shard into its rows (output_dim 0)
                    loaded, dst = files[f"{p}.{name}"], param[start:start + n]
                    assert loaded.shape == dst.shape, (p, name, loaded.shape, dst.shape)
                    # int8 as created; scale and offset float32 as msmodelslim writes them (ascendv1.py),
                    # copied into params_dtype by the loader
                    assert loaded.dtype == (torch.int8 if name == "weight" else torch.float32), (p, name)
                    assert description[f"{p}.{name}"] == "W8A16"
                    dst.copy_(loaded)
                start += n
            # process_weights_after_loading: weight -> (in, out), scale and offset -> (out,); apply() runs
            # torch_npu.npu_weight_quant_batchmatmul (_op_plugin_docs.py): x @ ((weight + offset) * scale)
            weight = params["weight"].transpose(0, 1).contiguous()  # (in, out)
            scale, offset = params["weight_scale"].flatten().float(), params["weight_offset"].flatten().float()
            layers[f"model.layers.{i}.{module}"] = ((weight.float() + offset) * scale).transpose(0, 1)
    return layers


def test_w8a16_loads_like_vllm_ascend_within_int8_bound(w8a16_dir: Path, tiny_random_llama_dir: Path) -> None:
    layers = load_like_vllm_ascend(w8a16_dir)
    original, files = _tensors(tiny_random_llama_dir), _tensors(w8a16_dir)
    assert len(layers) == 2 * len(VLLM_LINEARS)
    for module, w in layers.items():
        block, fused = module.rsplit(".", 1)
        shards = VLLM_LINEARS[f"{block.rsplit('.', 1)[1]}.{fused}"]
        ref = torch.cat([original[f"{block}.{s}.weight"] for s in shards])  # (out, in), rows in shard order
        scale = torch.cat([files[f"{block}.{s}.weight_scale"] for s in shards])  # (out, 1)
        err = (w - ref.float()).abs()
        assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-12), (module, (err / scale).max())


def test_description_types_every_tensor(w8a16_dir: Path, tiny_random_llama_dir: Path) -> None:
    description = json.loads((w8a16_dir / "quant_model_description.json").read_text())
    files, original = _tensors(w8a16_dir), _tensors(tiny_random_llama_dir)
    assert {k: description[k] for k in HEADER} == {"model_quant_type": "W8A16", "version": "1.0.0", "group_size": 0}
    assert set(description) - HEADER == set(files)  # one entry per stored tensor, no more
    for name, t in files.items():
        module = name.rsplit(".", 2)[-2]
        if module in LINEARS:
            assert description[name] == "W8A16", name
        else:  # norms, embed_tokens, lm_head: untouched
            assert description[name] == "FLOAT", name
            assert t.dtype == original[name].dtype and torch.equal(t, original[name]), name
    assert description["model.embed_tokens.weight"] == description["lm_head.weight"] == "FLOAT"
    offsets = [t for n, t in files.items() if n.endswith("weight_offset")]
    assert len(offsets) == 2 * len(LINEARS) and all(not t.any() for t in offsets)  # symmetric int8


def test_weight_files_and_index(w8a16_dir: Path, source_dir: Path) -> None:
    manifest = json.loads((w8a16_dir / "quant_manifest.json").read_text())
    weights = sorted(p.name for p in w8a16_dir.glob("*.safetensors"))
    assert sorted(manifest["files"]) == weights
    assert not (w8a16_dir / "model.safetensors.index.json").exists()  # vLLM would filter our files by it
    n = len(list(source_dir.glob("*.safetensors")))
    index = w8a16_dir / "quant_model_weight_w8a16.safetensors.index.json"
    if n == 1:
        assert weights == ["quant_model_weight_w8a16.safetensors"] and not index.exists()
        return
    assert weights == [f"quant_model_weight_w8a16-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = json.loads(index.read_text())["weight_map"]
    assert weight_map == {name: f.name for f in w8a16_dir.glob("*.safetensors") for name in load_file(f)}


def test_read_gives_back_what_quantize_produced(w8a16_dir: Path, tiny_random_llama_dir: Path) -> None:
    original = _tensors(tiny_random_llama_dir)
    got = read(w8a16_dir)
    assert set(got) == set(original)
    via_registry = read_quantized(w8a16_dir, "msmodelslim")
    for name, w in original.items():
        t = got[name]
        if name.rsplit(".", 2)[-2] not in LINEARS:
            assert torch.equal(t, w) and torch.equal(via_registry[name], w), name
            continue
        q, scale = quantize_per_channel_int8(w)
        assert isinstance(t, QuantizedWeight) and (t.bits, t.group_size, t.zero) == (8, None, None), name
        assert t.qweight.dtype == torch.int8 and torch.equal(t.qweight, q) and torch.equal(t.scale, scale), name
        assert torch.equal(via_registry[name].dequantize(), t.dequantize()), name


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_w4a16_is_refused_with_the_supported_choices(tiny_random_llama_dir: Path, tmp_path: Path,
                                                     group_size: int) -> None:
    # vllm-ascend registers W4A16 for MoE experts only (methods/w4a16.py): a dense Llama would not load
    with pytest.raises(ValueError, match=r"supported: w8a16, w8a8, w8a8-dynamic .*compressed-tensors"):  # refused by the config
        _quantize(tiny_random_llama_dir, tmp_path / "out", scheme="w4a16", group_size=group_size)


def test_part_of_a_fused_layer_in_float_is_refused(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    ignore = ("model.embed_tokens", "lm_head", "model.layers.1.self_attn.k_proj")
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.qkv_proj \(q_proj: W8A16, k_proj: FLOAT"):
        _quantize(tiny_random_llama_dir, tmp_path / "out", ignore=ignore)


def test_whole_fused_group_in_float_is_accepted(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _quantize(tiny_random_llama_dir, out, ignore=("model.embed_tokens", "lm_head", "model.layers.0.mlp.*_proj"))
    description = json.loads((out / "quant_model_description.json").read_text())
    assert {description[f"model.layers.0.mlp.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj")} == {"FLOAT"}
    assert "model.layers.0.mlp.gate_proj.weight_scale" not in description
    got = read(out)
    assert not isinstance(got["model.layers.0.mlp.up_proj.weight"], QuantizedWeight)
    assert isinstance(got["model.layers.1.mlp.up_proj.weight"], QuantizedWeight)


def test_quantized_embedding_is_refused(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"keep model\.embed_tokens in quantization\.ignore"):  # by the config
        _quantize(tiny_random_llama_dir, tmp_path / "out", ignore=("lm_head",))


def test_read_refuses_a_type_it_does_not_know(w8a16_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(w8a16_dir, copy)
    path = copy / "quant_model_description.json"
    description = json.loads(path.read_text())
    description["model.layers.0.mlp.down_proj.weight"] = "W4A8_DYNAMIC"
    path.write_text(json.dumps(description))
    with pytest.raises(NpuflowError, match="W4A8_DYNAMIC; npuflow reads W8A16, W8A8, W8A8_DYNAMIC and FLOAT"):
        read(copy)
