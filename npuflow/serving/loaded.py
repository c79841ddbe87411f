"""LoadedModel: one registered version in memory on its device, with its engine and tokenizer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from npuflow.core.artifacts import Deployable
from npuflow.registry import client as registry
from npuflow.runtime.engine import Engine
from npuflow.serving.generation import Batcher


@dataclass
class LoadedModel:
    """A registry version loaded on its device; its engine thread (batcher) runs every request on it."""

    version: registry.ModelVersion
    deployable: Deployable
    model: torch.nn.Module
    engine: Engine  # the runtime's generation loop on this model (decode compiled in graph mode)
    batcher: Batcher  # the engine thread: continuous batching of this version's requests
    tokenizer: Any
    device: torch.device
    context: int  # max_position_embeddings: prompt + generated tokens at most
    eos: frozenset[int]  # token ids that end a completion
    tok_lock: threading.Lock = field(default_factory=threading.Lock)  # the Rust tokenizer is not shared-safe
    in_flight: int = 0  # requests queued or running on this model (guarded by the pool's lock)
    loaded_s: int = field(default_factory=lambda: int(time.time()))  # when it was loaded, Unix seconds

    @property
    def label(self) -> str:
        return self.version.version
