"""A registered version loaded for serving: its weights from the store, checked, with its engine."""

from __future__ import annotations

import logging

import torch

from npuflow.core.artifacts import Deployable, QuantizedArtifact, load_manifest, materialize
from npuflow.core.errors import NpuflowError
from npuflow.core.names import Runtime
from npuflow.core.store import open_store
from npuflow.registry import client as registry
from npuflow.runtime.backends import get_backend
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import DTYPES, load_quantized, load_tokenizer
from npuflow.serving.generation import Batcher
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool

log = logging.getLogger("npuflow.serve")


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
    that it answers (a prefill and a decode step through its engine), and start its engine thread."""
    deployable, location = registry.deployable_of(c, version)
    backend = get_backend(deployable.device)
    quantized, store = _find_quantized(deployable, location, opts.store_uri)
    model_dir = materialize(store, quantized.key, quantized.files, opts.cache_dir)
    graph = deployable.runtime == Runtime.NPUFLOW_GRAPH
    model = load_quantized(model_dir, backend, DTYPES[deployable.dtype])  # graph mode: the engine compiles
    tokenizer = load_tokenizer(model_dir)
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id,
                                                                      tokenizer.eos_token_id]
    context = int(cfg.max_position_embeddings)
    engine = Engine(model, max_len=context, slots=opts.max_batch, compile=graph)
    with torch.inference_mode():  # it answers: a prefill and a decode step (graph mode compiles here)
        logits = engine.prefill(0, [tokenizer.bos_token_id or 0])  # (1, V)
        logits = torch.cat([logits, engine.step(0, logits.argmax(-1, keepdim=True), torch.ones(1, 1, dtype=torch.long,
                                                                                              device=logits.device))])
    if not torch.isfinite(logits).all():
        raise NpuflowError(f"{version.name} version {version.version} produced NaN/Inf logits when loaded")
    lm = LoadedModel(version=version, deployable=deployable, model=model, tokenizer=tokenizer, engine=engine,
                     batcher=Batcher(engine, version.version, max_request_s=opts.max_request_s),
                     device=backend.device(), context=context, eos=frozenset(i for i in eos if i is not None))
    log.info("loaded %s version %s (%s, %s) from %s", version.name, version.version, deployable.device,
             deployable.dtype, model_dir)
    return lm


def registry_pool(opts: ServeOptions):
    """The pool serving `opts.name` from the MLflow registry at opts.tracking_uri."""
    c = registry.client(opts.tracking_uri)
    return ModelPool(opts, resolve=lambda alias: registry.by_alias(c, opts.name, alias),
                     load=lambda version: load_version(c, version, opts), where=opts.tracking_uri)
