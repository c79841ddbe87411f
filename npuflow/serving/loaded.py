"""LoadedModel: one registered version being served: in memory on its device with its engine thread (the
npuflow engine), or a vLLM engine it streams from (remote); the tokenizer is the router's either way."""

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
from npuflow.serving.remote import RemoteEngine


@dataclass
class LoadedModel:
    """A registry version loaded on its device; its engine thread (batcher) runs every request on it, or
    (remote set, model/engine/batcher None) the vLLM engine does."""

    version: registry.ModelVersion
    deployable: Deployable
    model: torch.nn.Module | None
    engine: Engine | None  # the runtime's generation loop on this model (decode compiled in graph mode)
    batcher: Batcher | None  # the engine thread: continuous batching of this version's requests
    tokenizer: Any
    device: torch.device
    context: int  # max_position_embeddings: prompt + generated tokens at most
    eos: frozenset[int]  # token ids that end a completion
    tok_lock: threading.Lock = field(default_factory=threading.Lock)  # the Rust tokenizer is not shared-safe
    in_flight: int = 0  # requests queued or running on this model (guarded by the pool's lock)
    loaded_s: int = field(default_factory=lambda: int(time.time()))  # when it was loaded, Unix seconds
    remote: RemoteEngine | None = None  # the vLLM engine serving this version (engine vllm)
    vocab_size: int = 0  # the model's vocabulary (token-id prompts are checked against it)

    def close(self, wait: bool = False) -> None:
        """Stop its engine: the engine thread after the requests it holds, or the vLLM process group (in a
        thread unless wait: stopping it can take seconds, and this may run on the event loop)."""
        if self.batcher is not None:
            self.batcher.close()
        if self.remote is not None:
            if wait:
                self.remote.close()
            else:
                threading.Thread(target=self.remote.close, name=f"stop-{self.label}", daemon=True).start()

    @property
    def label(self) -> str:
        return self.version.version
