"""Quantize stage: weight-only integer quantization, streamed shard by shard from safetensors.

Layered as gpt-fast's quantize.py: tensor primitives, then one handler per scheme (same methods),
then one entry point (quantize_dir) that streams shards through a handler into a format writer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from npuflow.core.artifacts import (
    FileEntry,
    ModelArtifact,
    QuantizedArtifact,
    digest,
    hash_dir,
    load_manifest,
    materialize,
    publish,
    staging_dir,
)
from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError
from npuflow.core.store import Store
from npuflow.formats.mlmodel import write_mlmodel
from npuflow.quant.checkpoint import check_calibration
from npuflow.quant.fallback import quantize_with_fallback
from npuflow.quant.model import quantize_model

log = logging.getLogger("npuflow.quantize")

CODE_VERSION = "quantize-4"  # bump when the output of a scheme changes (4: the MLmodel), so old keys miss


def quantize(model: ModelArtifact, cfg: QuantizationConfig, store: Store, cache_root: Path,
             validation=None) -> QuantizedArtifact:
    """The quantize stage: cache hit when the same model + config + code version is published.

    `validation` (ValidationConfig) is needed by fallback auto, which scores candidates against its gates.
    """
    if cfg.fallback == "auto" and validation is None:
        raise ConfigError("quantization.fallback auto needs the validation section (eval text and gates)")
    scoring = validation if cfg.fallback == "auto" else None
    key = f"models/{model.name}/quantized/{digest(model.manifest_sha256, cfg, scoring, CODE_VERSION)[:16]}"
    found = load_manifest(store, key, QuantizedArtifact)
    if found is not None:
        log.info("cache hit: %s", found.uri)
        return found
    texts = {"validation.eval_text": validation.eval_text} if scoring else None
    check_calibration(cfg, model.hf_config, model.files, texts)  # before the weights are materialized
    src = materialize(store, model.key, model.files, cache_root)
    with staging_dir("quantize") as tmp:
        out = Path(tmp)
        qm = quantize_with_fallback(src, out, cfg, validation) if scoring else quantize_model(src, out, cfg)
        write_mlmodel(out)  # the registered version loads with mlflow.pyfunc (formats/mlmodel.py)
        files: dict[str, FileEntry] = hash_dir(out)
        weights = sum(files[n].size for n in qm["files"])
        artifact = QuantizedArtifact(
            uri=store.url(key), key=key, name=model.name, source_manifest_sha256=model.manifest_sha256,
            scheme=cfg.scheme, group_size=qm["group_size"], format=cfg.format, files=files,
            quantized_tensors=sum(t["quantized"] for t in qm["tensors"].values()),
            float_tensors=sum(not t["quantized"] for t in qm["tensors"].values()),
            size_bytes=weights,
        )
        log.info("publishing %s: %d quantized, %d float tensors, %.2f MB", artifact.uri,
                 artifact.quantized_tensors, artifact.float_tensors, weights / 1e6)
        return publish(store, artifact, out)
