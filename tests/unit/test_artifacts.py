"""Artifact manifests: content hashing, manifest-last publishing, loading, verification, materialize."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from npuflow.core.artifacts import (
    MANIFEST,
    FileEntry,
    ModelArtifact,
    digest,
    hash_dir,
    load_manifest,
    materialize,
    publish,
    verify_files,
)
from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import IntegrityError
from npuflow.core.store import LocalStore, open_store

KEY = "models/m/abc123"


@pytest.fixture
def model_files(tmp_path: Path) -> Path:
    """A small model directory with a nested file."""
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (d / "model.safetensors").write_bytes(b"\x00\x01" * 5000)
    (d / "sub" / "tokenizer.json").write_text("{}")
    return d


def _artifact(store_uri: str, files: dict[str, FileEntry], key: str = KEY) -> ModelArtifact:
    return ModelArtifact(
        uri=f"{store_uri}/{key}", key=key, name="m", source_uri="file:///src", files=files,
        hf_config={"architectures": ["LlamaForCausalLM"]},
    )


# ---------------------------------------------------------------------------------------------- digest


def test_digest_is_independent_of_dict_key_order() -> None:
    assert digest({"a": 1, "b": {"x": 1, "y": 2}}) == digest({"b": {"y": 2, "x": 1}, "a": 1})


def test_digest_changes_with_content() -> None:
    base = digest({"a": 1}, "v1")
    assert digest({"a": 2}, "v1") != base
    assert digest({"a": 1}, "v2") != base
    assert digest("v1", {"a": 1}) != base  # positional parts keep their order
    assert len(base) == 64 and int(base, 16) >= 0


def test_digest_of_a_model_equals_digest_of_its_json() -> None:
    cfg = QuantizationConfig()
    assert digest(cfg) == digest(cfg.model_dump(mode="json"))
    assert digest(cfg) != digest(QuantizationConfig(ignore=()))


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_sha256_excludes_uri(model_files: Path, tmp_path: Path) -> None:
    files = hash_dir(model_files)
    a = publish(open_store(str(tmp_path / "s1")), _artifact((tmp_path / "s1").as_uri(), files), model_files)
    b = publish(open_store(str(tmp_path / "s2")), _artifact("s3://bucket/prefix", files), model_files)
    assert a.uri != b.uri
    assert a.manifest_sha256 == b.manifest_sha256  # same content, any store
    assert b"uri" not in a.manifest_bytes().replace(b"source_uri", b"")
    changed = _artifact("s3://bucket/prefix", {**files, "extra.txt": FileEntry(sha256="0" * 64, size=1)})
    assert changed.manifest_sha256 != a.manifest_sha256


def test_hash_dir(model_files: Path) -> None:
    files = hash_dir(model_files)
    assert set(files) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    data = (model_files / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (model_files / MANIFEST).write_text("{}")
    assert MANIFEST not in hash_dir(model_files)  # a manifest never lists itself


def test_publish_writes_files_then_manifest(model_files: Path, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    art = publish(store, _artifact(store.uri, hash_dir(model_files)), model_files)
    assert store.list_keys(KEY) == sorted(
        [f"{KEY}/config.json", f"{KEY}/model.safetensors", f"{KEY}/sub/tokenizer.json", f"{KEY}/{MANIFEST}"]
    )
    for name in art.files:
        assert store.read_bytes(f"{KEY}/{name}") == (model_files / name).read_bytes()
    published = json.loads(store.read_bytes(f"{KEY}/{MANIFEST}"))
    assert "uri" not in published and "cache_hit" not in published
    assert published["files"]["model.safetensors"]["size"] == 10000
    assert store.read_bytes(f"{KEY}/{MANIFEST}") == art.manifest_bytes()


def test_publish_that_fails_midway_leaves_no_manifest(model_files: Path, tmp_path: Path) -> None:
    """A crash part-way through the upload must not leave anything that looks whole."""
    store = open_store(str(tmp_path / "store"))
    files = hash_dir(model_files)
    (model_files / "sub" / "tokenizer.json").unlink()  # the last upload will fail
    with pytest.raises(FileNotFoundError):
        publish(store, _artifact(store.uri, files), model_files)
    assert store.exists(f"{KEY}/config.json")  # some files went up ...
    assert not store.exists(f"{KEY}/{MANIFEST}")  # ... but the manifest did not
    assert load_manifest(store, KEY, ModelArtifact) is None


def test_publish_without_files_writes_the_manifest_only(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    publish(store, _artifact(store.uri, {}))
    assert store.list_keys(KEY) == [f"{KEY}/{MANIFEST}"]


def test_load_manifest_missing_returns_none(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    assert load_manifest(store, KEY, ModelArtifact) is None
    store.write_bytes(f"{KEY}/config.json", b"{}")  # files without a manifest are not an artifact
    assert load_manifest(store, KEY, ModelArtifact) is None


def test_load_manifest_is_a_cache_hit_located_in_this_store(model_files: Path, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    built = _artifact("s3://somewhere/else", hash_dir(model_files))
    assert built.cache_hit is False
    publish(store, built, model_files)
    found = load_manifest(store, KEY, ModelArtifact)
    assert found is not None
    assert found.cache_hit is True
    assert found.uri == store.url(KEY) == (Path(tmp_path / "store").resolve() / KEY).as_uri()
    assert found.manifest_sha256 == built.manifest_sha256
    assert found == built.model_copy(update={"uri": store.url(KEY), "cache_hit": True})


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"kind": "model"}', b"\xff\xfe\x00"],
    ids=["bad-json", "empty", "missing-fields", "not-utf8"],
)
def test_load_manifest_corrupt_raises(tmp_path: Path, content: bytes) -> None:
    store = open_store(str(tmp_path))
    store.write_bytes(f"{KEY}/{MANIFEST}", content)
    with pytest.raises(IntegrityError, match=rf"(?s)corrupt manifest .*{KEY}/{MANIFEST}.*re-run the stage"):
        load_manifest(store, KEY, ModelArtifact)


def test_load_manifest_of_another_kind_raises(model_files: Path, tmp_path: Path) -> None:
    from npuflow.core.artifacts import QuantizedArtifact

    store = open_store(str(tmp_path))
    publish(store, _artifact(store.uri, hash_dir(model_files)), model_files)
    with pytest.raises(IntegrityError, match="corrupt manifest"):
        load_manifest(store, KEY, QuantizedArtifact)


@pytest.mark.parametrize("content", [b"[1, 2]", b"null"], ids=["array", "null"])
def test_load_manifest_non_object_json_raises_integrity_error(tmp_path: Path, content: bytes) -> None:
    store = open_store(str(tmp_path))
    store.write_bytes(f"{KEY}/{MANIFEST}", content)
    with pytest.raises(IntegrityError, match="corrupt manifest"):
        load_manifest(store, KEY, ModelArtifact)


# ---------------------------------------------------------------------------------------------- verification


def test_verify_files_accepts_intact_files(model_files: Path) -> None:
    verify_files(model_files, hash_dir(model_files))


def test_verify_files_size_mismatch(model_files: Path) -> None:
    files = hash_dir(model_files)
    with open(model_files / "model.safetensors", "ab") as f:
        f.write(b"!")
    with pytest.raises(IntegrityError, match=r"model\.safetensors in .* does not match its recorded sha256"):
        verify_files(model_files, files)


def test_verify_files_content_mismatch_same_size(model_files: Path) -> None:
    files = hash_dir(model_files)
    p = model_files / "sub" / "tokenizer.json"
    p.write_text("[]")  # same 2 bytes, different content
    assert p.stat().st_size == files["sub/tokenizer.json"].size
    with pytest.raises(IntegrityError, match=r"sub/tokenizer\.json in .* does not match"):
        verify_files(model_files, files)


def test_verify_files_missing_file(model_files: Path) -> None:
    files = hash_dir(model_files)
    (model_files / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"config\.json is missing"):
        verify_files(model_files, files)


def test_materialize_local_store_reads_in_place(model_files: Path, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, LocalStore)
    art = publish(store, _artifact(store.uri, hash_dir(model_files)), model_files)
    cache = tmp_path / "cache"
    path = materialize(store, KEY, art.files, cache)
    assert path == store.root / KEY
    assert (path / "model.safetensors").read_bytes() == (model_files / "model.safetensors").read_bytes()
    assert not cache.exists()  # nothing copied for a local store


def test_materialize_local_store_verifies(model_files: Path, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    art = publish(store, _artifact(store.uri, hash_dir(model_files)), model_files)
    (store.root / KEY / "model.safetensors").write_bytes(b"\x00\x02" * 5000)  # bit rot in the store
    with pytest.raises(IntegrityError, match=r"model\.safetensors .*does not match"):
        materialize(store, KEY, art.files, tmp_path / "cache")


def test_staging_dirs_of_dead_runs_are_swept_and_live_or_foreign_ones_kept(tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import sys

    from npuflow.core import artifacts

    monkeypatch.setattr(artifacts.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    host = artifacts._host()
    left = tmp_path / f"npuflow-quantize-{host}-{dead}-abc123"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f"npuflow-fetch-{host}-{os.getpid()}-def456"
    foreign = tmp_path / f"npuflow-fetch-otherhost-{dead}-ghi789"
    unrelated = tmp_path / f"npuflow-notes-{dead}"
    for d in (live, foreign, unrelated):
        d.mkdir()
    with artifacts.staging_dir("convert") as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(f"npuflow-convert-{host}-{os.getpid()}-")
        assert not left.exists() and live.is_dir() and foreign.is_dir() and unrelated.is_dir()
    assert artifacts.sweep_staging(tmp_path) == []
