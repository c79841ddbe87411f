"""W8A16 quantization: the int8 primitive's error bound, and quantize_dir on real (small, random) Llama checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import NpuflowError
from npuflow.quant.primitives import dequantize_per_channel_int8, quantize_per_channel_int8
from npuflow.quant.streaming import quantize_dir

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LINEAR = 2 * len(LINEARS)  # 2 decoder blocks
INDEX = "model.safetensors.index.json"


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in d."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _is_linear(name: str) -> bool:
    return name.endswith(tuple(f"{m}.weight" for m in LINEARS))


def _quantize(src: Path, out: Path, **cfg) -> dict:
    out.mkdir(parents=True)
    return quantize_dir(src, out, QuantizationConfig(**cfg))


# ---------------------------------------------------------------------------------------------- primitive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_channel_int8_round_trip_error_bound(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    row_scales = torch.logspace(-4, 2, 24)[:, None]  # rows spanning six decades of magnitude
    w = (torch.randn(24, 96, generator=gen) * row_scales).to(dtype)  # (out, in)
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape == (24,) and scale.dtype == torch.float32
    assert int(q.min()) >= -127 and int(q.max()) <= 127  # symmetric: -128 is never used
    deq = dequantize_per_channel_int8(q, scale)
    err = (w.float() - deq).abs().amax(dim=1)  # (out,) worst error per row
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-12), (err / scale).max()
    assert torch.isfinite(scale).all() and torch.all(deq[3] == 0)
    # the largest weight of each non-zero row maps to +-127: the full int8 range is used
    nonzero = torch.arange(24) != 3
    assert torch.all(q[nonzero].abs().amax(dim=1) == 127)


def test_per_channel_int8_scales_are_per_row() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0]])
    q, scale = quantize_per_channel_int8(w)
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127, 100.0 / 127]))
    assert q.tolist() == [[64, -127, 32], [127, 0, -64]]


# ---------------------------------------------------------------------------------------------- quantize_dir


def test_quantize_dir_default(tiny_random_llama_dir: Path, quantized_llama_dir: Path) -> None:
    src, out = _tensors(tiny_random_llama_dir), _tensors(quantized_llama_dir)
    linears = [n for n in src if _is_linear(n)]
    assert len(linears) == N_LINEAR
    linears.append("lm_head.weight")  # the native format's default quantizes it too (int8 per channel)
    for name in linears:
        q, scale = out[name], out[name.removesuffix("weight") + "weight_scale"]
        assert q.dtype == torch.int8 and q.shape == src[name].shape, name
        assert scale.shape == (src[name].shape[0],) and scale.dtype == torch.float32, name
        err = (dequantize_per_channel_int8(q, scale) - src[name]).abs().amax(dim=1)
        assert torch.all(err <= scale / 2 * (1 + 1e-5)), name
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert out[name].dtype == torch.float32 and torch.equal(out[name], src[name]), name
    assert "model.embed_tokens.weight_scale" not in out
    # nothing else changed or went missing; only scales were added
    assert set(out) == set(src) | {n.removesuffix("weight") + "weight_scale" for n in linears}
    assert (quantized_llama_dir / "config.json").read_bytes() == (tiny_random_llama_dir / "config.json").read_bytes()
    assert (quantized_llama_dir / "generation_config.json").is_file()
    # the point of it: int8 weights make the checkpoint smaller
    size = sum(p.stat().st_size for p in quantized_llama_dir.glob("*.safetensors"))
    assert size < 0.75 * (tiny_random_llama_dir / "model.safetensors").stat().st_size


def test_quant_manifest(quantized_llama_dir: Path) -> None:
    qm = json.loads((quantized_llama_dir / "quant_manifest.json").read_text())
    assert qm["scheme"] == "w8a16" and qm["format"] == "native" and qm["bits"] == 8
    assert qm["group_size"] is None  # one scale per output channel
    assert qm["ignore"] == ["model.embed_tokens"]  # native weight-only default: lm_head quantized
    assert set(qm["files"]) == {"model.safetensors"}
    for name, sha in qm["files"].items():
        assert hashlib.sha256((quantized_llama_dir / name).read_bytes()).hexdigest() == sha
    out = _tensors(quantized_llama_dir)
    # the manifest lists the model's logical tensors (scales are the format's business)
    assert set(qm["tensors"]) == {n for n in out if not n.endswith("weight_scale")}
    for name, t in qm["tensors"].items():
        assert t["quantized"] == (_is_linear(name) or name == "lm_head.weight"), name
        assert t["shape"] == list(out[name].shape) and t["dtype"] == str(out[name].dtype).removeprefix("torch.")
        if t["quantized"]:
            assert t["bits"] == 8 and t["group_size"] is None and t["source_dtype"] == "float32"


def test_ignore_nothing_quantizes_lm_head_and_embeddings(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    qm = _quantize(tiny_random_llama_dir, tmp_path / "q", ignore=())
    out = _tensors(tmp_path / "q")
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert out[name].dtype == torch.int8, name
        assert qm["tensors"][name]["quantized"] is True
        assert out[name.removesuffix("weight") + "weight_scale"].shape == (128,)  # vocab rows
    assert out["model.norm.weight"].dtype == torch.float32  # norms are never quantized
    assert sum(t["quantized"] for t in qm["tensors"].values()) == N_LINEAR + 2


def test_ignore_patterns_are_fnmatch(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    qm = _quantize(tiny_random_llama_dir, tmp_path / "q", ignore=("lm_head", "model.embed_tokens", "*.layers.0.*"))
    out = _tensors(tmp_path / "q")
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert out["model.layers.1.self_attn.q_proj.weight"].dtype == torch.int8
    assert sum(t["quantized"] for t in qm["tensors"].values()) == len(LINEARS)


def test_sharded_checkpoint(tiny_random_llama_sharded_dir: Path, tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "q"
    qm = _quantize(tiny_random_llama_sharded_dir, out_dir)
    shards = sorted(p.name for p in tiny_random_llama_sharded_dir.glob("*.safetensors"))
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == shards  # one output shard per input shard
    index = json.loads((out_dir / INDEX).read_text())
    # the index maps every output tensor, scales included, to the shard that really holds it
    held = {}
    for shard in shards:
        with safe_open(out_dir / shard, framework="pt") as f:
            held |= dict.fromkeys(f.keys(), shard)
    assert index["weight_map"] == held
    assert sum(n.endswith("weight_scale") for n in held) == N_LINEAR + 1  # + lm_head
    # same tensors as the single-file quantization of the same weights
    single = _quantize(tiny_random_llama_dir, tmp_path / "single")
    assert qm["tensors"] == single["tensors"]
    sharded_t, single_t = _tensors(out_dir), _tensors(tmp_path / "single")
    assert all(torch.equal(sharded_t[n], single_t[n]) for n in single_t)
    assert set(qm["files"]) == set(shards)
    for name, sha in qm["files"].items():
        assert hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == sha
    assert (out_dir / "config.json").read_bytes() == (tiny_random_llama_sharded_dir / "config.json").read_bytes()


def test_stale_sha256sums_is_not_copied(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_dir, src)
    (src / "SHA256SUMS").write_text(f"{'0' * 64}  model.safetensors\n")
    (src / "tokenizer.json").write_text("{}")
    _quantize(src, tmp_path / "q")
    assert not (tmp_path / "q" / "SHA256SUMS").exists()  # its sums describe the float weights
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------- errors


def test_non_llama_architecture(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpuflowError, match=r"GPT2LMHeadModel.*is not Llama-family; supported: LlamaForCausalLM"):
        _quantize(src, tmp_path / "q")
    assert list((tmp_path / "q").iterdir()) == []  # refused before writing anything


def test_nan_weight(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_dir, src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.weight"][5, 7] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        NpuflowError, match=r"tensor model\.layers\.1\.self_attn\.q_proj\.weight in model\.safetensors has NaN"
    ):
        _quantize(src, tmp_path / "q")


def test_inf_weight(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_dir, src)
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"][0] = float("inf")  # float tensors kept as-is are checked too
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NpuflowError, match=r"tensor model\.norm\.weight in model\.safetensors has NaN or Inf"):
        _quantize(src, tmp_path / "q")


def test_index_naming_a_missing_shard(tiny_random_llama_sharded_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_sharded_dir, src)
    gone = sorted(src.glob("*.safetensors"))[-1]
    gone.unlink()
    with pytest.raises(NpuflowError, match=rf"{INDEX} names shards that are missing: {gone.name}"):
        _quantize(src, tmp_path / "q")


@pytest.mark.parametrize("n_files", [0, 2])
def test_ambiguous_weights_without_index(tiny_random_llama_dir: Path, tmp_path: Path, n_files: int) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_dir, src)
    if n_files == 0:
        (src / "model.safetensors").unlink()
    else:
        shutil.copy(src / "model.safetensors", src / "model-copy.safetensors")
    with pytest.raises(NpuflowError, match=rf"has {n_files} safetensors files and no {INDEX}"):
        _quantize(src, tmp_path / "q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_channel_int8_leaves_the_input_untouched(dtype: torch.dtype) -> None:
    w = torch.randn(2048, 8, dtype=dtype)  # more rows than one block
    before = w.clone()
    quantize_per_channel_int8(w)
    assert torch.equal(w, before)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KB tmpfs (root only): the disk fills up for real."""
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_a_clear_error(tiny_random_llama_dir: Path, small_disk: Path) -> None:
    out = small_disk / "q"
    out.mkdir()
    with pytest.raises(NpuflowError, match=r"disk space to write model\.safetensors .*nothing was published"):
        quantize_dir(tiny_random_llama_dir, out, QuantizationConfig())


def test_group_size_must_divide_every_input_width(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    # hidden 64: a group of 128 input channels cannot tile q_proj's input
    with pytest.raises(NpuflowError, match=r"group size 128 does not divide the input dimension 64 of model\.layers\.0\."):
        _quantize(tiny_random_llama_dir, tmp_path / "q", scheme="w4a16", group_size=128)


def test_shard_that_does_not_match_config_json(tiny_random_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_random_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 256  # the shards hold 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpuflowError, match=r"mlp\.(gate|up|down)_proj\.weight in model\.safetensors has shape .* but config\.json implies"):
        _quantize(src, tmp_path / "q")
