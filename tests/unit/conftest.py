"""Unit-test fixtures: small random Llama checkpoints (HF layout), each built once per session.

The session-scoped directories are shared: a test that corrupts or edits a checkpoint copies it first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir

# ~90k parameters: 2 blocks x 7 linears, GQA (4 query heads over 2 kv heads), vocab 128
TINY_LLAMA = {
    "hidden_size": 64,  # d_model
    "intermediate_size": 128,  # d_ff
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim = 16
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "tie_word_embeddings": False,  # lm_head is its own (V, d_model) tensor, as in Llama-2
}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No tqdm bars from save_pretrained / from_pretrained while building fixtures."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _make_tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM (float32, eval mode); global RNG state is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**TINY_LLAMA, architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_random_llama() -> torch.nn.Module:
    """The float model object (do not modify it in a test: deepcopy first)."""
    return _make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_random_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_random_llama) -> Path:
    """The float model saved as one model.safetensors + config.json + generation_config.json."""
    out = tmp_path_factory.mktemp("llama") / "tiny-random-llama"
    with _quiet_transformers():
        tiny_random_llama.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_random_llama_sharded_dir(tmp_path_factory: pytest.TempPathFactory, tiny_random_llama) -> Path:
    """The same weights saved in 100 KB shards with model.safetensors.index.json."""
    out = tmp_path_factory.mktemp("llama-sharded") / "tiny-random-llama"
    with _quiet_transformers():
        tiny_random_llama.save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


@pytest.fixture(scope="session")
def quantized_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_random_llama_dir: Path) -> Path:
    """tiny_random_llama_dir quantized with the default config (embed_tokens and lm_head kept float)."""
    out = tmp_path_factory.mktemp("quantized") / "w8a16"
    out.mkdir()
    quantize_dir(tiny_random_llama_dir, out, QuantizationConfig())
    return out


@pytest.fixture(scope="session")
def demo_w8a16(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model quantized W8A16 (the default QuantizationConfig), once per session; do not edit it."""
    out = tmp_path_factory.mktemp("demo") / "w8a16"
    out.mkdir()
    quantize_dir(tiny_model_dir, out, QuantizationConfig())
    return out


@pytest.fixture(scope="session")
def demo_model(demo_w8a16: Path):
    """demo_w8a16 loaded on the CPU in float32: (model, tokenizer)."""
    from npuflow.runtime.backends import cpu
    from npuflow.runtime.loader import load_quantized, load_tokenizer

    return load_quantized(demo_w8a16, cpu, torch.float32), load_tokenizer(demo_w8a16)
