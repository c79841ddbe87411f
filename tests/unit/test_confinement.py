"""Names read from files stay inside their directory: a crafted checkpoint is refused before any write."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npuflow.core.artifacts import (
    MANIFEST,
    FileEntry,
    ModelArtifact,
    hash_dir,
    load_manifest,
    materialize,
    verify_files,
)
from npuflow.core.config import QuantizationConfig, SourceConfig
from npuflow.core.errors import NpuflowError, UnsafeNameError
from npuflow.core.paths import check_name, confined
from npuflow.core.store import LocalStore
from npuflow.quant.checkpoint import INDEX
from npuflow.quant.streaming import quantize_dir
from npuflow.stages.fetch import fetch

REPO = Path(__file__).resolve().parents[2]
ESCAPE = "../outside/model.safetensors"


def _state(p: Path) -> tuple[str, int, int]:
    st = p.stat()
    return hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mode


@pytest.fixture(scope="module")
def untrained_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's layout and tokenizer, trained 2 steps (these tests need files, not quality)."""
    from npuflow.demo.tinymodel import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("demo") / "tiny-llama", steps=2)


@pytest.fixture
def crafted(tmp_path: Path, untrained_demo_dir: Path) -> tuple[Path, Path]:
    """tmp/ckpt: the demo model's config and tokenizer, and an index whose weight_map names
    ../outside/model.safetensors (the real shard, next to the checkpoint)."""
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    ckpt.mkdir()
    outside.mkdir()
    for p in untrained_demo_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("SHA256SUMS", INDEX):
            shutil.copy2(p, ckpt / p.name)
    shutil.copy2(untrained_demo_dir / "model.safetensors", outside / "model.safetensors")
    os.chmod(outside / "model.safetensors", 0o640)
    from safetensors import safe_open

    with safe_open(outside / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: ESCAPE for n in names}}))
    return ckpt, outside / "model.safetensors"


def _npuflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUFLOW_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(REPO), NPUFLOW_HOME=str(cwd / ".npuflow"))
    return subprocess.run([sys.executable, "-m", "npuflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_quantize_refuses_a_shard_name_outside_the_checkpoint(crafted, tmp_path: Path) -> None:
    """The repro of issue 13 hole 0: before the fix this exited 0 and rewrote tmp/outside/model.safetensors."""
    ckpt, victim = crafted
    before = _state(victim)
    out = tmp_path / "out"
    proc = _npuflow("quantize", str(ckpt), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ESCAPE in proc.stderr and INDEX in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _state(victim) == before
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")] == []


def test_cli_quantize_file_uri_refuses_it_at_fetch(crafted, tmp_path: Path) -> None:
    ckpt, victim = crafted
    before = _state(victim)
    out = tmp_path / "out"
    proc = _npuflow("quantize", ckpt.as_uri(), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ESCAPE in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert _state(victim) == before
    assert not out.exists()
    store = tmp_path / ".npuflow" / "artifacts"
    assert not list(store.rglob(MANIFEST)) if store.exists() else True  # nothing published


def test_fetch_refuses_the_crafted_index_and_publishes_nothing(crafted, tmp_path: Path) -> None:
    ckpt, victim = crafted
    store = LocalStore(tmp_path / "store")
    with pytest.raises(UnsafeNameError, match=r"\.\./outside/model\.safetensors"):
        fetch(SourceConfig(uri=ckpt.as_uri()), "crafted", store)
    assert store.list_keys("") == []
    assert victim.is_file()


def test_quantize_dir_refuses_before_writing(crafted, tmp_path: Path) -> None:
    ckpt, victim = crafted
    before = _state(victim)
    out = tmp_path / "qout"
    out.mkdir()
    with pytest.raises(UnsafeNameError, match=INDEX):
        quantize_dir(ckpt, out, QuantizationConfig())
    assert list(out.iterdir()) == []
    assert _state(victim) == before


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "", ".", "a//b", "a\\..\\x", "C:x", "a\x00b",
                                  "a/.", 3, None])
def test_check_name_refuses(name) -> None:
    with pytest.raises(UnsafeNameError, match="nothing was read or written"):
        check_name(name, source="some.json")


@pytest.mark.parametrize("name", ["model.safetensors", "sub/tokenizer.json", "..json", "a..b"])
def test_check_name_accepts(name: str, tmp_path: Path) -> None:
    assert confined(tmp_path, name, source="x") == tmp_path / name


def test_unsafe_name_is_a_clear_cli_error() -> None:
    assert issubclass(UnsafeNameError, NpuflowError) and UnsafeNameError.exit_code == 2


def _published(store: LocalStore, files: dict) -> str:
    key = "models/m/source/abc"
    body = {"kind": "model", "key": key, "name": "m", "source_uri": "file:///src", "files": files, "hf_config": {}}
    store.write_bytes(f"{key}/{MANIFEST}", json.dumps(body).encode())
    return key


def test_load_manifest_refuses_a_file_entry_outside_its_prefix(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    key = _published(store, {"../../../evil": {"sha256": "0" * 64, "size": 1}})
    with pytest.raises(UnsafeNameError, match=r"\.\./\.\./\.\./evil"):
        load_manifest(store, key, ModelArtifact)


def test_materialize_hash_and_verify_refuse_names_outside(tmp_path: Path) -> None:
    (tmp_path / "victim").write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    bad = {"../victim": FileEntry(sha256="0" * 64, size=4)}
    with pytest.raises(UnsafeNameError):
        verify_files(root, bad)
    with pytest.raises(UnsafeNameError):
        hash_dir(root, ["../victim"])
    store = LocalStore(tmp_path / "store")
    with pytest.raises(UnsafeNameError):
        materialize(store, "models/m/source/abc", bad, tmp_path / "cache")
    assert (tmp_path / "victim").read_text() == "keep"
