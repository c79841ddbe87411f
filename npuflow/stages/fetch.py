"""Fetch stage: published weights (file://, s3://, hf://) into the store, every file verified by sha256."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from npuflow.core.artifacts import (
    FileEntry,
    ModelArtifact,
    digest,
    load_manifest,
    publish,
    sha256_file,
    staging_dir,
)
from npuflow.core.config import SourceConfig
from npuflow.core.errors import ConfigError, IntegrityError, NpuflowError, StoreError
from npuflow.core.paths import check_name, confined
from npuflow.core.store import S3Store, Store, file_uri_path
from npuflow.quant.checkpoint import check_shard

log = logging.getLogger("npuflow.fetch")

SUMS_FILE = "SHA256SUMS"  # `sha256sum` format: "<hex>  <name>" per line
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load can run code from these
# what a model directory needs; other files (README, images, original/ checkpoints) are not fetched
WANTED = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja",
          SUMS_FILE)  # *.jinja: the chat template (transformers 5 saves it beside tokenizer_config.json)
_COPY_CHUNK = 16 << 20  # bytes per read when copying


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative POSIX path inside the source
    size: int | None  # bytes, when the listing says
    sha256: str | None  # expected, when the source (or the config) says
    git_sha1: str | None = None  # hub's blob id for non-LFS files (git's sha1 of "blob <size>\0" + data)


def _select(names: list[str], allow_pickle: bool) -> list[str]:
    """Files to fetch: safetensors weights when present; pickle weights only when allowed."""
    top = [n for n in names if "/" not in n]  # sub-folders (original/, onnx/) are other formats
    pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
    chosen = [n for n in top if any(fnmatch.fnmatch(n, pat) for pat in WANTED)]
    if not any(n.endswith(".safetensors") for n in chosen):
        if pickles and not allow_pickle:
            raise NpuflowError(
                f"the source has only pickle checkpoints ({', '.join(sorted(pickles)[:3])}), which can run "
                "arbitrary code when loaded; convert them to safetensors, or set source.allow_pickle: true "
                "if you trust the publisher"
            )
        chosen += pickles
    if "config.json" not in chosen:
        raise NpuflowError("the source has no config.json: it is not a Hugging Face model directory")
    return sorted(set(chosen))


def _parse_sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        if line.strip():
            hexd, _, name = line.strip().partition(" ")
            sums[name.strip().lstrip("*")] = hexd.lower()
    return sums


def _expected(files: list[SourceFile], cfg: SourceConfig) -> list[SourceFile]:
    """Apply the config's pinned hashes (they win over the source's own)."""
    names = {f.name for f in files}
    unknown = sorted(set(cfg.sha256) - names)
    if unknown:
        raise ConfigError(f"source.sha256 pins {', '.join(unknown)}, which the source does not have")
    return [SourceFile(f.name, f.size, cfg.sha256.get(f.name, f.sha256), f.git_sha1) for f in files]


def _copy_with_hash(read, dest: Path, total: int | None, label: str) -> str:
    """Stream `read(n)` into dest, returning its sha256; a progress bar for copies over 64 MB.

    A failure to write dest (disk full, quota, permission) is a StoreError that is not retried."""
    from tqdm import tqdm

    h = hashlib.sha256()
    show = total is not None and total > 64 << 20
    try:
        out = open(dest, "wb")
    except OSError as err:
        raise _write_error(err, dest, label) from None
    with out, tqdm(total=total, desc=label, unit="B", unit_scale=True, disable=not show) as bar:
        while chunk := read(_COPY_CHUNK):
            h.update(chunk)
            try:
                out.write(chunk)
            except OSError as err:
                raise _write_error(err, dest, label) from None
            bar.update(len(chunk))
    return h.hexdigest()


def _write_error(err: OSError, dest: Path, label: str) -> StoreError:
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = (f"the disk filled up writing {label} to {dest.parent}: free space there (or set TMPDIR to a "
               "larger disk) and re-run")
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"no permission to write {label} to {dest.parent} ({err.strerror}): fix the permissions or TMPDIR"
    else:
        why = f"writing {label} to {dest.parent} failed: {err}"
    return StoreError(f"{why}; nothing was published (not retried: a retry cannot fix this)", retryable=False)


def _check_index(path: Path, source: str) -> None:
    """A *.safetensors.index.json whose weight_map names a file outside the model directory is refused."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise NpuflowError(f"{path.name} from {source} is not a valid safetensors index ({err!r}): nothing "
                           "was published; re-publish the model") from None
    for name in sorted(names, key=str):
        check_name(name, source=f"{path.name} from {source}")


def _check(f: SourceFile, actual_sha256: str, path: Path, source: str) -> None:
    if f.sha256 and actual_sha256 != f.sha256:
        raise IntegrityError(
            f"{f.name} from {source} does not match its sha256: expected {f.sha256}, got {actual_sha256}. "
            "The download is corrupt or the source changed: nothing was published; re-publish the file "
            "or correct the expected hash"
        )
    if f.git_sha1:
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(_COPY_CHUNK):
                h.update(chunk)
        if h.hexdigest() != f.git_sha1:
            raise IntegrityError(f"{f.name} from {source} does not match the hub's blob id {f.git_sha1}")


# ---- sources: list, then copy each file into a staging directory ----------------------------------


class _FileSource:
    def __init__(self, uri: str):
        self.root = file_uri_path(uri)
        self.uri, self.revision = self.root.resolve().as_uri(), None  # absolute: the registry records it
        if not self.root.is_dir():
            raise NpuflowError(f"source directory {self.root} does not exist (from {uri})")

    def list(self) -> list[SourceFile]:
        names = [p.relative_to(self.root).as_posix() for p in sorted(self.root.rglob("*")) if p.is_file()]
        sums = _parse_sums((self.root / SUMS_FILE).read_text()) if SUMS_FILE in names else {}
        return [SourceFile(n, (self.root / n).stat().st_size, sums.get(n)) for n in names]

    def complete(self, files: list[SourceFile]) -> list[SourceFile]:
        """Hash files the source gives no sha256 for (local reads are cheap next to a copy)."""
        return [f if f.sha256 else SourceFile(f.name, f.size, sha256_file(self.root / f.name)) for f in files]

    def copy(self, f: SourceFile, dest: Path) -> str:
        with open(self.root / f.name, "rb") as src:
            return _copy_with_hash(src.read, dest, f.size, f.name)


class _S3Source:
    def __init__(self, uri: str):
        self.s3 = S3Store(uri)
        self.uri, self.revision = uri, None

    def list(self) -> list[SourceFile]:
        objs = self.s3.list_sizes()
        if not objs:
            raise NpuflowError(f"no objects under {self.uri}: check the bucket and prefix")
        sums = _parse_sums(self.s3.read_bytes(SUMS_FILE).decode()) if SUMS_FILE in objs else {}
        return [SourceFile(n, s, sums.get(n)) for n, s in sorted(objs.items())]

    def complete(self, files: list[SourceFile]) -> list[SourceFile]:
        return files  # hashed while copying

    def copy(self, f: SourceFile, dest: Path) -> str:
        """The object streamed into dest; botocore failures (before or during the download) are StoreErrors,
        retried when transient (connection, timeout, throttling, 5xx)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.s3._key(f.name))["Body"]
            return _copy_with_hash(body.read, dest, f.size, f.name)
        except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as err:
            raise self.s3._err(err, f.name) from None


class _HubSource:
    """hf://org/name@revision through huggingface_hub; the revision is pinned to its commit sha."""

    def __init__(self, uri: str, token_env: str):
        from huggingface_hub import HfApi

        repo, _, rev = uri.removeprefix("hf://").partition("@")
        self.repo, self.uri = repo, uri
        self.token = os.environ.get(token_env) or None
        try:
            info = HfApi().model_info(repo, revision=rev or None, files_metadata=True, token=self.token)
        except Exception as err:  # network, auth, gated repo: all end the same way for the user
            raise NpuflowError(
                f"cannot read {uri} from the Hugging Face hub: {err}. For gated models (meta-llama) accept "
                f"the licence on the hub and export {token_env}=<token>; offline, publish the weights to "
                "s3:// or a directory and use that uri"
            ) from None
        self.revision = info.sha
        self.siblings = info.siblings or []

    def list(self) -> list[SourceFile]:
        return [
            SourceFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
            for s in self.siblings
        ]

    def complete(self, files: list[SourceFile]) -> list[SourceFile]:
        return files

    def copy(self, f: SourceFile, dest: Path) -> str:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(self.repo, f.name, revision=self.revision, token=self.token)
        with open(path, "rb") as src:
            return _copy_with_hash(src.read, dest, f.size, f.name)


def open_source(cfg: SourceConfig):
    if cfg.uri.startswith("file://"):
        return _FileSource(cfg.uri)
    if cfg.uri.startswith("s3://"):
        return _S3Source(cfg.uri)
    return _HubSource(cfg.uri, cfg.token_env)


def ensure_demo_source(cfg: SourceConfig) -> None:
    """Build the demo model at the source path on first use (source.generate)."""
    if cfg.generate != "tiny-llama":
        return
    from npuflow.demo.tinymodel import build_tiny_llama

    path = file_uri_path(cfg.uri)
    if not path.exists():
        log.info("building the demo model at %s (first use, ~30 s)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_llama(path, progress=True)


def fetch(cfg: SourceConfig, name: str, store: Store) -> ModelArtifact:
    """Publish the source's model files into the store under a key derived from their hashes.

    Cache hit when that key's manifest exists. Every copied file is hashed and compared with the
    source's manifest (SHA256SUMS, the hub's LFS sha256) and with the config's pins.
    """
    ensure_demo_source(cfg)
    src = open_source(cfg)
    listing = src.list()
    wanted = set(_select([f.name for f in listing], cfg.allow_pickle))
    files = _expected([f for f in listing if f.name in wanted], cfg)
    known = all(f.sha256 or f.git_sha1 for f in files)
    if known:  # the key is known before copying: a cache hit costs no transfer
        files = src.complete(files)
        cached = _cached(store, name, files)
        if cached is not None:
            return cached
    with staging_dir("fetch") as tmp:
        stage = Path(tmp)
        _check_free_space(files, stage, store, src)
        entries: dict[str, FileEntry] = {}
        for f in sorted(files, key=lambda f: not f.name.endswith(".json")):  # indexes checked before weights
            dest = confined(stage, f.name, source=f"the listing of {cfg.uri}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            actual = src.copy(f, dest)
            _check(f, actual, dest, cfg.uri)
            if f.name.endswith(".safetensors.index.json"):
                _check_index(dest, cfg.uri)
            if f.name.endswith(".safetensors"):  # a truncated upload is named, not a SafetensorError later
                check_shard(dest, f" from {cfg.uri}", "nothing was published; re-publish that file")
            entries[f.name] = FileEntry(sha256=actual, size=dest.stat().st_size)
        files = [SourceFile(n, e.size, e.sha256) for n, e in entries.items()]
        cached = _cached(store, name, files) if not known else None
        if cached is not None:
            return cached
        try:
            hf_config = json.loads((stage / "config.json").read_text())
        except ValueError as err:
            raise NpuflowError(f"config.json from {cfg.uri} is not valid JSON: {err}") from None
        key = _key(name, files)
        artifact = ModelArtifact(
            uri=store.url(key), key=key, name=name, source_uri=src.uri, source_revision=src.revision,
            files=entries, hf_config=hf_config,
        )
        log.info("publishing %d files (%.1f MB) to %s", len(entries), sum(e.size for e in entries.values()) / 1e6, artifact.uri)
        return publish(store, artifact, stage)


SPACE_MARGIN = 256 << 20  # bytes left free after the copies (logs, the manifest, other writers)


def _check_free_space(files: list[SourceFile], stage: Path, store: Store, src) -> None:
    """Refuse before the first byte when a disk the fetch writes to cannot hold the model: the staging dir,
    a local store (a second copy) and the hub's download cache (a third), summed per filesystem. Sizes the
    source does not list count as 0. Not retried: a retry cannot free space."""
    import shutil

    from npuflow.core.store import LocalStore

    size = sum(f.size or 0 for f in files)
    places = [(stage, "the staging dir (TMPDIR)")]
    if isinstance(store, LocalStore):
        places.append((store.root, "the artifact store"))
    if isinstance(src, _HubSource):
        from huggingface_hub import constants

        places.append((Path(constants.HF_HUB_CACHE), "the Hugging Face cache (HF_HUB_CACHE)"))
    disks: dict[int, tuple[Path, list[str]]] = {}
    for path, what in places:
        existing = next(p for p in (path, *path.parents) if p.exists())
        disks.setdefault(existing.stat().st_dev, (existing, []))[1].append(what)
    for path, whats in disks.values():
        need, free = size * len(whats) + SPACE_MARGIN, shutil.disk_usage(path).free
        if free < need:
            raise StoreError(
                f"not enough free space to fetch {size / 1e9:.2f} GB from {src.uri}: {' and '.join(whats)} "
                f"on {path} need {need / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; free space there, or "
                "point TMPDIR (staging), NPUFLOW_HOME / the store, or HF_HOME at a larger disk. Nothing was "
                "downloaded (not retried: a retry cannot fix this)", retryable=False)


def _key(name: str, files: list[SourceFile]) -> str:
    ident = {f.name: f.sha256 or f"git-sha1:{f.git_sha1}" for f in files}
    return f"models/{name}/source/{digest(ident)[:16]}"


def _cached(store: Store, name: str, files: list[SourceFile]) -> ModelArtifact | None:
    found = load_manifest(store, _key(name, files), ModelArtifact)
    if found is not None:
        log.info("cache hit: %s already holds these %d files", found.uri, len(found.files))
    return found
