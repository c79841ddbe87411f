"""LoadedModel: one registered version in memory on its device, with its engine and tokenizer."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from npuflow.core.artifacts import Deployable
from npuflow.registry import client as registry
from npuflow.runtime.engine import Engine


@dataclass
class LoadedModel:
    """A registry version loaded on its device, with the lock that serialises its forward passes."""

    version: registry.ModelVersion
    deployable: Deployable
    model: torch.nn.Module
    engine: Engine  # the runtime's generation loop on this model (decode compiled in graph mode)
    tokenizer: Any
    device: torch.device
    context: int  # max_position_embeddings: prompt + generated tokens at most
    eos: frozenset[int]  # token ids that end a completion
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass at a time
    tok_lock: threading.Lock = field(default_factory=threading.Lock)  # the Rust tokenizer is not shared-safe
    in_flight: int = 0  # requests queued or running on this model (guarded by the pool's lock)

    @property
    def label(self) -> str:
        return self.version.version
