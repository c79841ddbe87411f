"""LocalStore through open_store: atomic writes, transfers, listing, key validation, URI handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.core.store import LocalStore, open_store


@pytest.fixture(params=["path", "file-uri"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore:
    """The same directory opened as a plain path and as a file:// URI."""
    root = tmp_path / "store"
    root.mkdir()
    s = open_store(str(root) if request.param == "path" else root.as_uri())
    assert isinstance(s, LocalStore)
    return s


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_open_store_path_and_uri_are_the_same_directory(tmp_path: Path) -> None:
    a, b = open_store(str(tmp_path)), open_store(tmp_path.as_uri())
    assert a.uri == b.uri == tmp_path.resolve().as_uri()
    a.write_bytes("k", b"x")
    assert b.read_bytes("k") == b"x"
    assert open_store(a.uri).read_bytes("k") == b"x"  # the store's own uri opens it again


def test_write_read_exists(store: LocalStore) -> None:
    key = "models/m/abc/config.json"
    assert not store.exists(key)
    store.write_bytes(key, b'{"a": 1}')
    assert store.exists(key)
    assert store.read_bytes(key) == b'{"a": 1}'
    assert (store.root / key).read_bytes() == b'{"a": 1}'  # a plain file a user can open
    assert store.url(key) == (store.root / key).as_uri()
    store.write_bytes(key, b"second")  # overwrite replaces the whole object
    assert store.read_bytes(key) == b"second"
    assert not store.exists("models/m")  # a prefix is not an object
    assert _leftovers(store.root) == []


def test_read_missing_key_names_it(store: LocalStore) -> None:
    with pytest.raises(NpuflowError, match=r"models/none/x\.bin does not exist in the artifact store"):
        store.read_bytes("models/none/x.bin")


def test_upload_and_download_files(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "outside" / "weights.safetensors"
    src.parent.mkdir()
    payload = bytes(range(256)) * 1000
    src.write_bytes(payload)
    store.upload_file("models/m/weights.safetensors", src)
    assert store.exists("models/m/weights.safetensors")
    assert store.read_bytes("models/m/weights.safetensors") == payload
    assert src.read_bytes() == payload  # the source is copied, not moved

    dest = tmp_path / "cache" / "deep" / "w.safetensors"  # parents are created
    store.download_file("models/m/weights.safetensors", dest)
    assert dest.read_bytes() == payload
    assert _leftovers(store.root) == [] and _leftovers(dest.parent) == []


def test_upload_onto_itself_keeps_the_content(store: LocalStore) -> None:
    store.write_bytes("a/b.txt", b"keep me")
    store.upload_file("a/b.txt", store.root / "a" / "b.txt")
    assert store.read_bytes("a/b.txt") == b"keep me"


def test_download_missing_key(store: LocalStore, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "x"
    with pytest.raises(NpuflowError, match=r"nope/x does not exist in the artifact store"):
        store.download_file("nope/x", dest)
    assert not dest.exists()


def test_list_keys_under_prefix(store: LocalStore) -> None:
    for key in ("models/a/x", "models/a/sub/y", "models/ab/z", "other/w"):
        store.write_bytes(key, b".")
    assert store.list_keys("models/a") == ["models/a/sub/y", "models/a/x"]  # not models/ab
    assert store.list_keys("models/a/") == ["models/a/sub/y", "models/a/x"]
    assert store.list_keys("models") == ["models/a/sub/y", "models/a/x", "models/ab/z"]
    assert store.list_keys("missing") == []
    assert store.list_keys("models/a/x") == []  # an object is not a prefix


def test_list_keys_skips_temporary_files(store: LocalStore) -> None:
    store.write_bytes("models/a/x", b".")
    # what a writer killed between write and rename leaves behind
    (store.root / "models" / "a" / ".y.tmp-deadbeef").write_bytes(b"half")
    assert store.list_keys("models/a") == ["models/a/x"]


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../escape", "a/../../escape", "a//b", "a/", "./a", ".."])
def test_invalid_keys_are_rejected(store: LocalStore, key: str) -> None:
    for call in (
        lambda: store.write_bytes(key, b"x"),
        lambda: store.read_bytes(key),
        lambda: store.exists(key),
        lambda: store.url(key),
    ):
        with pytest.raises(ValueError, match="invalid store key"):
            call()
    assert not (store.root.parent / "escape").exists()
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://example.com/store", "ftp://host/dir"])
def test_unsupported_scheme(uri: str) -> None:
    with pytest.raises(ConfigError, match=rf"unsupported artifact store '{uri}'.*s3://") as info:
        open_store(uri)
    assert info.value.exit_code == 2


def test_writes_leave_no_temporary_files(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"0123456789" * 100)
    for i in range(5):
        store.write_bytes(f"p/obj{i}", b"x" * i)
        store.upload_file(f"p/up{i}", src)
        store.download_file(f"p/up{i}", tmp_path / "back" / f"{i}.bin")
    assert list(store.root.rglob("*.tmp-*")) == []
    assert list((tmp_path / "back").rglob("*.tmp-*")) == []
    assert len(store.list_keys("p")) == 10


def test_file_uri_with_space_opens_that_directory(tmp_path: Path) -> None:
    root = tmp_path / "my store"
    root.mkdir()
    s = open_store(root.as_uri())  # file:///.../my%20store
    s.write_bytes("k", b"x")
    assert (root / "k").read_bytes() == b"x"
    assert open_store(s.uri).read_bytes("k") == b"x"


def test_list_keys_of_whole_store(store: LocalStore) -> None:
    store.write_bytes("a/x", b".")
    store.write_bytes("b/y", b".")
    assert store.list_keys("") == ["a/x", "b/y"]
