"""Artifact manifests exchanged between stages, content hashing, and manifest-last publishing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from npuflow.core.errors import IntegrityError
from npuflow.core.paths import check_names, confined
from npuflow.core.store import Store

MANIFEST = "manifest.json"
_CHUNK = 8 << 20  # bytes read per hashing step


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """sha256 of a canonical JSON rendering of `parts` (pydantic models, dicts, strings)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str  # store uri of the artifact prefix (where the files live)
    key: str  # store key prefix
    cache_hit: bool = Field(False, exclude=True)  # set when the stage found this already published

    def manifest_bytes(self) -> bytes:
        """The manifest as published: everything but `uri`, which depends on where the store is."""
        return json.dumps(self.model_dump(mode="json", exclude={"uri"}), sort_keys=True, indent=2).encode()

    @property
    def manifest_sha256(self) -> str:
        """Identity of the artifact: the same content has the same hash in any store."""
        return hashlib.sha256(self.manifest_bytes()).hexdigest()


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sha256: str
    size: int  # bytes


class ModelArtifact(_Manifest):
    """Upstream weights as published in the store (HF layout: config.json, *.safetensors, tokenizer)."""

    kind: Literal["model"] = "model"
    name: str
    source_uri: str
    source_revision: str | None = None
    files: dict[str, FileEntry]
    hf_config: dict[str, Any]


class QuantizedArtifact(_Manifest):
    kind: Literal["quantized"] = "quantized"
    name: str
    source_manifest_sha256: str  # the ModelArtifact it came from
    scheme: str  # w8a16, ...
    group_size: int | None = None  # input channels per scale; None = one scale per output channel
    format: str  # native, ...
    files: dict[str, FileEntry]
    quantized_tensors: int  # linear weights stored as integers
    float_tensors: int  # tensors kept in float (ignored layers, norms, embeddings)
    size_bytes: int  # all weight files together


class Deployable(_Manifest):
    """A quantized artifact made ready for one device and runtime, smoke-tested there."""

    kind: Literal["deployable"] = "deployable"
    name: str
    quantized_manifest_sha256: str
    quantized_key: str  # store key of the weights this runs
    device: str  # cpu, cuda, npu
    device_name: str  # e.g. the CPU model or GPU name
    runtime: str  # e.g. "npuflow-eager"
    dtype: str  # activation dtype
    kernels: dict[str, str]  # role -> op actually used, e.g. {"linear_w8a16": "aten._weight_int8pack_mm"}
    versions: dict[str, str]  # library -> version (torch, transformers, torch_npu, CANN, ...)
    smoke_logits_sha256: str  # fingerprint of the smoke forward pass (first 8 logits, rounded)
    files: dict[str, FileEntry] = Field(default_factory=dict)  # offline model files (offline/...), if any
    offline: dict[str, Any] | None = None  # offline_manifest.json: ONNX check, ATC status or command
    engine: str = "npuflow"  # the serving engine that loads it: npuflow (in process) or vllm (older manifests: npuflow)


class GateResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    passed: bool
    value: float
    threshold: float
    op: Literal["<=", ">="]


class ValidationReport(_Manifest):
    kind: Literal["validation"] = "validation"
    deployable_manifest_sha256: str
    eval_text_sha256: str
    eval_tokens: int  # scored positions
    metrics: dict[str, float]  # ppl_reference, ppl_candidate, ppl_delta_pct, top1_agreement, kl_divergence
    gates: dict[str, GateResult]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates.values())


class Roofline(BaseModel):
    """Measured against the device's peaks: decode is bandwidth-bound, prefill compute-bound."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    decode_bytes_per_step: float  # weights + the batch's KV cache at the mean decode context, bytes
    tpot_ms_bound: float | None  # decode step at peak bandwidth (None: no peak figure)
    achieved_gbs: float  # decode_bytes_per_step / TPOT p50, GB/s
    mbu_pct: float | None  # achieved / peak bandwidth, %
    prefill_flops: float  # 2 x params x prompt tokens + causal attention, whole batch
    ttft_ms_bound: float | None  # prefill at peak FLOP/s (None: no peak figure)
    achieved_tflops: float  # prefill_flops / TTFT p50, TFLOP/s
    mfu_pct: float | None  # achieved / peak FLOP/s, %
    note: str = ""  # why a figure is not available, e.g. "MFU not available: no peak FLOPS figure for a CPU"


class Scenario(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # e.g. bs1_in128_out32
    batch_size: int
    input_len: int
    output_len: int
    iterations: int
    ttft_ms: dict[str, float]  # p50, p90, p99, mean, stdev_pct
    tpot_ms: dict[str, float]
    decode_tokens_per_s: float  # batch_size * 1000 / tpot p50
    throughput_tokens_per_s: float  # generated tokens / end-to-end seconds (p50)
    e2e_ms_p50: float
    e2e_ms: dict[str, float] = Field(default_factory=dict)  # p50, p90, p99, mean, stdev_pct (end to end)
    mode: str = "single"  # single | tensor-parallel
    devices: int = 1  # ranks (tensor-parallel) or 1
    unstable: bool = False  # TPOT stdev % above the config's stability limit
    peak_memory_mb: float | None = None  # after this scenario (CPU: the process's peak RSS so far)
    energy_joules: float | None = None  # over the timed runs; None: no real counter
    energy_tokens_per_j: float | None = None  # generated tokens / energy_joules
    roofline: Roofline | None = None
    # tensor-/pipeline-parallel: rank 0's time inside all_reduce / all_gather / send / recv / broadcast per decode
    # step of the timed runs, and that time as % of the decode step time
    comm_ms_per_step: float | None = None
    comm_share_pct: float | None = None


class BenchmarkReport(_Manifest):
    kind: Literal["benchmark"] = "benchmark"
    deployable_manifest_sha256: str
    device: str
    device_name: str
    scenarios: list[Scenario]
    metrics: dict[str, float]  # DESIGN.md names for the primary scenario
    peak_memory_mb: float
    model_size_mb: float
    energy: str  # "not measured: <reason>" or how it was measured
    roofline: dict[str, Any] = Field(default_factory=dict)  # peak figures used and their source, model bytes
    method: dict[str, Any] = Field(default_factory=dict)  # warmup, iterations, min_seconds, mode, ...
    greedy_tokens: dict[str, list[list[int]]] = Field(default_factory=dict)  # mode -> (B, n) greedy tokens
    report_files: list[str] = Field(default_factory=list)  # report.md, report.html, *.png beside it
    serving: list[dict[str, Any]] = Field(default_factory=list)  # the serving scenario: one entry per concurrency
    serving_method: dict[str, Any] = Field(default_factory=dict)  # its load tool, server command, lengths, SLOs
    # tensor-/pipeline-parallel: each rank's rank, stage, tp_rank, rank_weight_bytes, peak_rss_mb, peak_memory_mb
    ranks: list[dict[str, Any]] = Field(default_factory=list)
    planned: dict[str, Any] = Field(default_factory=dict)  # bench/plan.py's predictions for the measured layout


M = TypeVar("M", bound=_Manifest)


def load_manifest(store: Store, key: str, cls: type[M]) -> M | None:
    """The published manifest under `key`, or None when the artifact is not (fully) published."""
    mkey = f"{key}/{MANIFEST}"
    if not store.exists(mkey):
        return None
    try:
        data = json.loads(store.read_bytes(mkey))
        found = cls.model_validate({**data, "uri": store.url(key)}).model_copy(update={"cache_hit": True})
    except (ValueError, TypeError) as err:
        raise IntegrityError(
            f"corrupt manifest {store.url(mkey)}: {err}; delete that prefix and re-run the stage"
        ) from None
    check_names(getattr(found, "files", None) or {}, source=f"the manifest {store.url(mkey)}")
    return found


def hash_dir(root: Path, names: Iterable[str] | None = None) -> dict[str, FileEntry]:
    """FileEntry for each file (relative POSIX name) under root, manifest excluded."""
    paths = [confined(root, n, source=f"the file list for {root}") for n in names] if names is not None else sorted(p for p in root.rglob("*") if p.is_file())
    return {
        p.relative_to(root).as_posix(): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in paths
        if p.name != MANIFEST
    }


def publish(store: Store, manifest: M, local_dir: Path | None = None) -> M:
    """Upload `local_dir`'s files under manifest.key, then the manifest itself, last.

    Each object is written atomically by the store; a reader trusts a prefix only once its
    manifest exists, so a crash part-way leaves nothing that looks whole.
    """
    if local_dir is not None:
        files: dict[str, FileEntry] = getattr(manifest, "files", {}) or {}
        names = list(files) or [p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()]
        check_names(names, source=f"the {manifest.key} manifest")  # all refused before the first upload
        for name in names:
            store.upload_file(f"{manifest.key}/{name}", local_dir / name)
    store.write_bytes(f"{manifest.key}/{MANIFEST}", manifest.manifest_bytes())
    return manifest


def verify_files(root: Path, files: dict[str, FileEntry]) -> None:
    """Raise IntegrityError naming the first file whose size or sha256 differs."""
    check_names(files, source=f"the file list for {root}")
    for name, entry in files.items():
        p = root / name
        if not p.is_file():
            raise IntegrityError(f"{name} is missing from {root}; re-run fetch to restore it")
        if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            raise IntegrityError(
                f"{name} in {root} does not match its recorded sha256 {entry.sha256[:12]}…; "
                "the copy is corrupt or was modified: delete it and re-run"
            )


def materialize(store: Store, key: str, files: dict[str, FileEntry], cache_root: Path) -> Path:
    """A local directory holding the artifact's files, verified against their sha256.

    A local store is read in place (verified once per process); an S3 store is downloaded once into
    cache_root/<key> and re-used while sizes and hashes match.
    """
    check_names(files, source=f"the manifest of {store.url(key)}")  # before any read or download
    local = store.local_path(key)
    if local is not None:
        _verify_once(local, files)
        return local
    dest = cache_root / key
    marker = dest / ".verified"
    if marker.is_file() and marker.read_text() == digest({k: v.model_dump() for k, v in files.items()}):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name, entry in files.items():
        p = dest / name
        if not (p.is_file() and p.stat().st_size == entry.size and sha256_file(p) == entry.sha256):
            store.download_file(f"{key}/{name}", p)
    verify_files(dest, files)
    marker.write_text(digest({k: v.model_dump() for k, v in files.items()}))
    return dest


_verified: set[tuple[str, str]] = set()


def _verify_once(root: Path, files: dict[str, FileEntry]) -> None:
    tag = (str(root), digest({k: v.model_dump() for k, v in files.items()}))
    if tag not in _verified:
        verify_files(root, files)
        _verified.add(tag)


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]


def staging_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for building an artifact before publishing it, named after this host and
    process (npuflow-STAGE-HOST-PID-XXXX) so that the next run can tell a dead run's leftovers from a live
    one's: those are swept first (a run SIGKILLed mid-stage leaves its staging dir, up to a model's size)."""
    sweep_staging()
    return tempfile.TemporaryDirectory(prefix=f"npuflow-{prefix}-{_host()}-{os.getpid()}-")


def sweep_staging(root: Path | None = None) -> list[Path]:
    """Remove the staging dirs under `root` (the temp dir) of this host's processes that no longer exist;
    another host's (a shared /tmp) and live processes' are never touched. Returns what was removed."""
    import logging
    import re

    pattern = re.compile(rf"npuflow-[a-z0-9]+-{re.escape(_host())}-(\d+)-\w+")
    removed = []
    for p in Path(root or tempfile.gettempdir()).glob("npuflow-*"):
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1))) or not p.is_dir() or p.is_symlink():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        logging.getLogger("npuflow").info("removed %d staging dir(s) of runs that died: %s", len(removed),
                                          ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
