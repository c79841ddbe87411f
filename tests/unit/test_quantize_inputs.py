"""What the quantizer needs before it works (issue 12 part 2): real calibration text for a real model, a
tokenizer only where text is cut, whole shards; sensitivity only when asked, measured layer by layer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.core.text import load_eval_text
from npuflow.quant.checkpoint import check_shard, shard_names
from npuflow.quant.model import quantize_model
from npuflow.quant.streaming import quantize_dir

CAL = {"samples": 4, "seq_len": 32}
REPO = Path(__file__).resolve().parents[2]


def _checkpoint(d: Path, tokenizer: bool = True) -> Path:
    """A random 2-layer Llama (not the demo: no marker) in HF format, with a byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["a real model's text, not the demo corpus\n"] * 50, trainer=trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(d)
    return d


@pytest.fixture
def real_text(tmp_path: Path) -> str:
    """A file:// calibration set in JSON lines, as the shipped configs name in S3."""
    p = tmp_path / "cal.jsonl"
    p.write_text("".join(json.dumps({"text": f"document {i}: some text about things number {i * 7}."}) + "\n"
                         for i in range(200)))
    return p.as_uri()


# ---- config defaults -------------------------------------------------------------------------------


def test_sensitivity_is_off_by_default_and_on_with_fallback_auto() -> None:
    assert QuantizationConfig().sensitivity is False
    assert QuantizationConfig(fallback="auto").sensitivity is True
    with pytest.raises(ValueError, match="needs sensitivity: true"):
        QuantizationConfig(fallback="auto", sensitivity=False)


def test_default_quantize_needs_no_tokenizer_and_writes_no_sensitivity(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m", tokenizer=False)
    out = tmp_path / "q"
    out.mkdir()
    qm = quantize_model(src, out, QuantizationConfig())
    assert qm["method"] == "rtn" and any(t["quantized"] for t in qm["tensors"].values())
    assert not (out / "sensitivity.json").exists()


# ---- calibration text ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{"method": "gptq"}, {"sensitivity": True}], ids=["gptq", "sensitivity"])
def test_the_demo_corpus_is_refused_for_another_model_before_any_work(tmp_path: Path, cfg: dict) -> None:
    src = _checkpoint(tmp_path / "m")
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(ConfigError, match=r"quantization\.calibration\.text is 'builtin:tiny-corpus-train'.*"
                                          r"synthetic corpus.*s3://") as err:
        quantize_model(src, out, QuantizationConfig(calibration=CAL, **cfg))
    assert "--calibration" in str(err.value)
    assert list(out.iterdir()) == []  # refused before anything was written


def test_fallback_refuses_the_demo_eval_text_too(tmp_path: Path, real_text: str) -> None:
    from npuflow.core.config import ValidationConfig
    from npuflow.quant.fallback import quantize_with_fallback

    src = _checkpoint(tmp_path / "m")
    cfg = QuantizationConfig(fallback="auto", calibration={**CAL, "text": real_text})
    with pytest.raises(ConfigError, match=r"validation\.eval_text is 'builtin:tiny-corpus'"):
        quantize_with_fallback(src, tmp_path, cfg, ValidationConfig(eval_text="builtin:tiny-corpus"))


def test_named_calibration_text_runs_sensitivity_on_a_real_model(tmp_path: Path, real_text: str) -> None:
    src = _checkpoint(tmp_path / "m")
    out = tmp_path / "q"
    out.mkdir()
    qm = quantize_model(src, out, QuantizationConfig(sensitivity=True, calibration={**CAL, "text": real_text}))
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["calibration"]["text"] == real_text
    assert set(report["output_error"]) == {k for k, t in qm["tensors"].items() if t["quantized"]}
    assert all(0 < e < 1 for e in report["output_error"].values())


def test_jsonl_text_is_its_text_fields(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "first"}\n\n{"text": "second", "meta": 1}\n')
    assert load_eval_text(p.as_uri()) == "first\n\nsecond"
    p.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(NpuflowError, match=r'line 2 of .* not a JSON object with a "text"'):
        load_eval_text(p.as_uri())


# ---- tokenizer -------------------------------------------------------------------------------------


def test_gptq_without_tokenizer_fails_before_any_work(tmp_path: Path, real_text: str) -> None:
    src = _checkpoint(tmp_path / "m", tokenizer=False)
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(NpuflowError, match=r"method gptq need.* tokenizer .* has none .* method rtn"):
        quantize_model(src, out, QuantizationConfig(method="gptq", calibration={**CAL, "text": real_text}))
    assert list(out.iterdir()) == []


def test_an_unloadable_tokenizer_is_one_message_naming_who_needs_it(tmp_path: Path, real_text: str) -> None:
    src = _checkpoint(tmp_path / "m", tokenizer=False)
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")  # what Llama-2 ships
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(NpuflowError, match=r"sensitivity need.* tokenizer of .* could not be loaded") as err:
        quantize_model(src, out, QuantizationConfig(sensitivity=True, calibration={**CAL, "text": real_text}))
    assert len(str(err.value).splitlines()) == 1 and list(out.iterdir()) == []


# ---- truncated shards ------------------------------------------------------------------------------


def test_a_truncated_shard_is_named_before_any_output(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m", tokenizer=False)
    shard = src / "model.safetensors"
    check_shard(shard)  # whole: no error
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(NpuflowError, match=r"model\.safetensors in .* is truncated: its header describes \d+ bytes, "
                                           r"the file has \d+"):
        quantize_dir(src, out, QuantizationConfig())
    assert list(out.iterdir()) == []
    with shard.open("r+b") as f:
        f.truncate(5)  # not even the header length
    with pytest.raises(NpuflowError, match=r"model\.safetensors in .* is not a valid safetensors file"):
        shard_names(src)


def test_fetch_names_a_truncated_shard(tmp_path: Path) -> None:
    from npuflow.core.config import SourceConfig
    from npuflow.core.store import open_store
    from npuflow.stages.fetch import fetch

    src = _checkpoint(tmp_path / "m")
    shutil.copy(src / "model.safetensors", tmp_path / "whole")
    with (src / "model.safetensors").open("r+b") as f:
        f.truncate(4096)
    store = open_store((tmp_path / "store").as_uri())
    with pytest.raises(NpuflowError, match=r"model\.safetensors from file://.* is truncated.*nothing was published"):
        fetch(SourceConfig(uri=src.as_uri()), "m", store)
    assert not list((tmp_path / "store").rglob("*.safetensors"))


# ---- sensitivity, streamed -------------------------------------------------------------------------


def test_sensitivity_measured_directly_equals_the_hessian_formula(tmp_path: Path, real_text: str) -> None:
    """The streamed measure sum ||X (W - W_q)^T||^2 / sum ||X W^T||^2 is GPTQ's tr(D H D^T) / tr(W H W^T)."""
    from npuflow.quant.gptq import INPUT_GROUPS, _hessians, _prepare, output_error
    from npuflow.quant.schemes import for_tensor, get_handler
    from npuflow.quant.sensitivity import calibration_inputs, rtn_sensitivity

    src = _checkpoint(tmp_path / "m")
    cfg = QuantizationConfig(scheme="w4a16", group_size=32, sensitivity=True, calibration={**CAL, "text": real_text})
    windows, handler, ignore = calibration_inputs(src, cfg), get_handler(cfg), tuple(cfg.ignore)
    streamed = rtn_sensitivity(src, handler, ignore, windows)
    config, ckpt, (decoder_cls, _), x, layers = _prepare(src, handler, ignore, windows, torch.device("cpu"))
    for i in range(config.num_hidden_layers):
        layer = ckpt.layer(decoder_cls, config, i).float()
        hs = _hessians(layers, layer, [g[0] for g in INPUT_GROUPS], x)
        for grp in INPUT_GROUPS:
            for m in grp:
                w = layer.get_submodule(m).weight.detach()
                expected = output_error(w, handler.quantize(w).dequantize(), hs[grp[0]])
                assert streamed[f"model.layers.{i}.{m}.weight"] == pytest.approx(expected, rel=1e-5)
        layers.run(layer, x, keep=True)
    # the lm_head (int8 in this 4-bit model) on the final norm of the last hidden state
    t = ckpt.read(["model.norm.weight", "lm_head.weight"])
    xn = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * t["model.norm.weight"]).reshape(
        -1, config.hidden_size).double()
    w = t["lm_head.weight"].float()
    q = for_tensor(handler, "lm_head.weight").quantize(w)
    assert q.bits == 8
    expected = output_error(w, q.dequantize(), (xn.T @ xn) * (2.0 / xn.shape[0]))
    assert streamed["lm_head.weight"] == pytest.approx(expected, rel=1e-4)
    assert len(streamed) == 7 * config.num_hidden_layers + 1


# ---- the command users run -------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUFLOW_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(REPO), NPUFLOW_HOME=str(cwd / ".npuflow"))
    return subprocess.run([sys.executable, "-m", "npuflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_quantize_file_uri_in_place_without_tokenizer_and_its_refusals(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "m", tokenizer=False)
    ok = _cli("quantize", src.as_uri(), "--output", str(tmp_path / "q"), "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["method"] == "rtn" and not (tmp_path / "q" / "sensitivity.json").exists()
    assert not (tmp_path / ".npuflow" / "artifacts").exists()  # read in place: no copy into the store

    gptq = _cli("quantize", src.as_uri(), "--output", str(tmp_path / "g"), "--method", "gptq", cwd=tmp_path)
    assert gptq.returncode == 2 and "quantization.calibration.text" in gptq.stderr, gptq.stderr
    sens = _cli("quantize", str(src), "--output", str(tmp_path / "s"), "--sensitivity",
                "--calibration", (tmp_path / "none.txt").as_uri(), cwd=tmp_path)
    assert sens.returncode != 0 and "tokenizer" in sens.stderr and "Traceback" not in sens.stderr, sens.stderr

    (src / "SHA256SUMS").write_text(f"{'0' * 64}  model.safetensors\n")
    bad = _cli("quantize", src.as_uri(), "--output", str(tmp_path / "b"), cwd=tmp_path)
    assert bad.returncode != 0 and "model.safetensors in file://" in bad.stderr and "SHA256SUMS" in bad.stderr
    (src / "SHA256SUMS").unlink()
    with (src / "model.safetensors").open("r+b") as f:
        f.truncate(4096)
    cut = _cli("quantize", src.as_uri(), "--output", str(tmp_path / "t"), cwd=tmp_path)
    assert cut.returncode != 0 and "model.safetensors in " in cut.stderr and "is truncated" in cut.stderr, cut.stderr
    assert "Traceback" not in cut.stderr and len(cut.stderr.strip().splitlines()) <= 3
    assert not [p for p in tmp_path.iterdir() if p.name in ("g", "s", "b", "t") or ".tmp-" in p.name]


def test_the_pipeline_stage_refuses_before_materializing(tmp_path: Path, real_text: str) -> None:
    """The quantize stage checks the calibration text and the tokenizer from the manifest alone."""
    from npuflow.core.config import SourceConfig, ValidationConfig
    from npuflow.core.store import open_store
    from npuflow.quant.stage import quantize
    from npuflow.stages.fetch import fetch

    store = open_store((tmp_path / "store").as_uri())
    model = fetch(SourceConfig(uri=_checkpoint(tmp_path / "m", tokenizer=False).as_uri()), "m", store)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="builtin:tiny-corpus-train"):
        quantize(model, QuantizationConfig(method="gptq"), store, cache)
    with pytest.raises(NpuflowError, match=r"sensitivity need.* tokenizer"):
        quantize(model, QuantizationConfig(sensitivity=True, calibration={"text": real_text}), store, cache)
    with pytest.raises(ConfigError, match=r"validation\.eval_text"):
        quantize(model, QuantizationConfig(fallback="auto", calibration={"text": real_text}), store, cache,
                 ValidationConfig(eval_text="builtin:tiny-corpus"))
    assert not list((tmp_path / "store").rglob("quantized"))  # nothing was published
    plain = quantize(model, QuantizationConfig(), store, cache)  # RTN: no tokenizer, no text
    assert plain.scheme == "w8a16" and plain.quantized_tensors == 15  # 14 decoder linears + lm_head
