"""MLflow's python_function flavour of an npuflow quantized artifact (the loader its MLmodel names).

    model = mlflow.pyfunc.load_model("models:/llama-2-7b@champion")             # CPU
    model = mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})      # or npu
    model.predict(["The capital of France is"], params={"max_tokens": 16})       # -> ["..."]

The weights load through the same loader and engine the server runs (greedy decoding, stop at EOS), on
the device's default dtype. The files are checked against the artifact's manifest (the store's
manifest.json, which the download brings along) before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from npuflow.core.artifacts import QuantizedArtifact, verify_files
from npuflow.core.errors import ConfigError, IntegrityError
from npuflow.formats.mlmodel import DEFAULT_MAX_TOKENS
from npuflow.runtime.backends import get_backend
from npuflow.runtime.engine import Engine, SamplingParams
from npuflow.runtime.loader import load_quantized, load_tokenizer, resolve_dtype, stop_token_ids
from npuflow.runtime.scheduler import Scheduler

DEVICES = ("cpu", "cuda", "npu")


class QuantizedPyfunc:
    """predict(prompts) -> completions, one engine slot per prompt of a call."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str = "auto", max_batch: int = 8):
        _check(path)
        backend = get_backend(device)
        self.model = load_quantized(path, backend, resolve_dtype(dtype, backend))
        self.tokenizer = load_tokenizer(path)
        self.stop = stop_token_ids(self.model.config.eos_token_id, self.tokenizer)
        self.max_batch, self.context = max_batch, int(self.model.config.max_position_embeddings)
        self.engine = Engine(self.model, max_len=self.context, slots=max_batch)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        prompts = _prompts(model_input)
        max_tokens = int((params or {}).get("max_tokens", DEFAULT_MAX_TOKENS))
        out: list[str] = []
        for i in range(0, len(prompts), self.max_batch):
            sched = Scheduler(self.engine)
            seqs = []
            for p in prompts[i: i + self.max_batch]:
                ids = self.tokenizer(p)["input_ids"]
                if len(ids) + max_tokens > self.context:
                    raise ConfigError(f"a prompt of {len(ids)} tokens plus max_tokens {max_tokens} exceeds the "
                                      f"model's context of {self.context} tokens: shorten it")
                seqs.append(sched.submit(ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=self.stop)))
            with torch.inference_mode():
                sched.run_until_done()
            out += [self.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
        return out


def _check(path: Path) -> None:
    """Every file the artifact's manifest lists, by size and sha256 (IntegrityError otherwise)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise IntegrityError(f"{path} has no manifest.json: not an npuflow quantized artifact as the store "
                             "publishes it; download the whole version (models:/NAME@ALIAS), not a part")
    published = json.loads(manifest.read_bytes())  # as published: without the store uri
    verify_files(path, QuantizedArtifact.model_validate({**published, "uri": path.as_uri()}).files)


def _prompts(model_input: Any) -> list[str]:
    """A string, a list of strings, or the one-column DataFrame MLflow makes of them."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # pandas DataFrame (MLflow's schema enforcement) or Series
        col = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return [str(v) for v in col.tolist()]
    if isinstance(model_input, list | tuple) and all(isinstance(v, str) for v in model_input):
        return list(model_input)
    raise ConfigError(f"predict takes a prompt string or a list of them, not {type(model_input).__name__}")


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> QuantizedPyfunc:
    conf = dict(model_config or {})
    device = conf.pop("device", "cpu")
    if device not in DEVICES:
        raise ConfigError(f"model_config device {device!r}: use one of {', '.join(DEVICES)}")
    unknown = set(conf) - {"dtype", "max_batch"}
    if unknown:
        raise ConfigError(f"unknown model_config keys {sorted(unknown)}; known: device, dtype, max_batch")
    return QuantizedPyfunc(Path(path), device, conf.get("dtype", "auto"), int(conf.get("max_batch", 8)))
