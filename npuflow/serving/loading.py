"""TODO."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from npuflow.core.artifacts import Deployable, QuantizedArtifact, load_manifest, materialize
from npuflow.core.errors import NpuflowError
from npuflow.core.names import Runtime
from npuflow.core.store import open_store
from npuflow.registry import client as registry
from npuflow.runtime.backends import get_backend
from npuflow.runtime.loader import DTYPES, load_quantized, load_tokenizer
from npuflow.serving.options import ServeOptions

log = logging.getLogger("npuflow.serve")


@dataclass
class LoadedModel:
    """A registry version loaded on its device, with the lock that serialises its forward passes."""

    version: registry.ModelVersion
    deployable: Deployable
    model: torch.nn.Module
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


def _find_quantized(deployable: Deployable, location: dict[str, str], store_uri: str):
    """The quantized weights' manifest and store: the configured store first, then the recorded one."""
    roots = [store_uri]
    uri, key = location.get("uri", ""), location.get("key", "")
    if key and uri.endswith(key):
        roots.append(uri[: -len(key)].rstrip("/"))
    for root in dict.fromkeys(roots):
        store = open_store(root)
        found = load_manifest(store, deployable.quantized_key, QuantizedArtifact)
        if found is not None:
            return found, store
    raise NpuflowError(
        f"the quantized weights {deployable.quantized_key} are not in {' or '.join(dict.fromkeys(roots))}; "
        "re-run the release or point NPUFLOW_STORE_URI at the store that holds them"
    )


def load_version(c, version: registry.ModelVersion, opts: ServeOptions) -> LoadedModel:
    """Load a registered version's quantized weights with its deployable's device and dtype, then check
    that it answers (one forward pass)."""
    deployable, location = registry.deployable_of(c, version)
    backend = get_backend(deployable.device)
    quantized, store = _find_quantized(deployable, location, opts.store_uri)
    model_dir = materialize(store, quantized.key, quantized.files, opts.cache_dir)
    graph = deployable.runtime == Runtime.NPUFLOW_GRAPH
    model = load_quantized(model_dir, backend, DTYPES[deployable.dtype], graph=graph)
    tokenizer = load_tokenizer(model_dir)
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id,
                                                                      tokenizer.eos_token_id]
    lm = LoadedModel(version=version, deployable=deployable, model=model, tokenizer=tokenizer,
                     device=backend.device(), context=int(cfg.max_position_embeddings),
                     eos=frozenset(i for i in eos if i is not None))
    with torch.inference_mode():
        logits = model(torch.tensor([[tokenizer.bos_token_id or 0]], device=lm.device)).logits  # (1, 1, V)
    if not torch.isfinite(logits).all():
        raise NpuflowError(f"{version.name} version {version.version} produced NaN/Inf logits when loaded")
    log.info("loaded %s version %s (%s, %s) from %s", version.name, version.version, deployable.device,
             deployable.dtype, model_dir)
    return lm
