"""Offline model: the ONNX export matches the runtime, the ATC step is exact, bad input writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.demo.tinymodel import build_tiny_llama
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.loader import load_quantized
from npuflow.runtime.offline import ATC_NOT_RUN, export_onnx

SEQ = 24  # tokens per sequence of the exported graphs: small keeps each export ~3 s

# A stand-in for CANN's atc: records its working directory and argv, writes <--output>.om, exits $FAKE_ATC_RC.
FAKE_ATC = """#!/bin/sh
pwd > "$FAKE_ATC_RECORD"
for a in "$@"; do echo "$a" >> "$FAKE_ATC_RECORD"; done
echo "ATC run: fake"
rc="${FAKE_ATC_RC:-0}"
if [ "$rc" = 0 ]; then
  for a in "$@"; do case "$a" in --output=*) printf 'OM' > "${a#--output=}.om";; esac; done
fi
exit "$rc"
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's architecture and tokenizer (4 blocks, d 128, vocab 512), 1 training step (~4 s)."""
    return build_tiny_llama(tmp_path_factory.mktemp("demo") / "tiny-llama", steps=1)


def _quantized(demo_dir: Path, out: Path, cfg: QuantizationConfig) -> Path:
    out.mkdir()
    quantize_dir(demo_dir, out, cfg)
    return out


@pytest.fixture(scope="module")
def w8_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantized(demo_dir, tmp_path_factory.mktemp("q") / "w8a16", QuantizationConfig())


@pytest.fixture(scope="module")
def w4_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantized(demo_dir, tmp_path_factory.mktemp("q") / "w4a16",
                      QuantizationConfig(scheme="w4a16", group_size=32))


@pytest.fixture(scope="module")
def w8_all_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embeddings and lm_head int8 too (W8Embedding, QuantLinear head)."""
    return _quantized(demo_dir, tmp_path_factory.mktemp("q") / "w8a16-all", QuantizationConfig(ignore=()))


@pytest.fixture(scope="module")
def w8_offline(w8_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """w8a16 exported with batch 2 on a PATH without atc."""
    out = tmp_path_factory.mktemp("offline") / "w8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.path.dirname(sys.executable))  # python, but no atc
        export_onnx(w8_dir, out, seq_len=SEQ, batch_size=2)
    return out


@pytest.fixture
def fake_atc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `atc` first on PATH; returns the file it records into."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "atc").write_text(FAKE_ATC)
    (bin_dir / "atc").chmod(0o755)
    record = tmp_path / "atc-argv.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ATC_RECORD", str(record))
    return record


def _onnx_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])


# ---------------------------------------------------------------------------------------------- export


def test_w8a16_onnx_matches_the_runtime_on_a_new_prompt(w8_offline: Path, w8_dir: Path) -> None:
    ids = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(123))  # not the export's check
    with torch.inference_mode():
        ref = load_quantized(w8_dir, cpu, torch.float32)(ids).logits  # (2, T, 512)
    got = _onnx_logits(w8_offline / "model.onnx", ids)
    assert got.shape == (2, SEQ, 512)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_manifest_records_the_check_shapes_and_hashes(w8_offline: Path, w8_dir: Path) -> None:
    m = json.loads((w8_offline / "offline_manifest.json").read_text())
    assert sorted(p.name for p in w8_offline.iterdir()) == [
        "OFFLINE.md", "atc_command.sh", "model.onnx", "offline_manifest.json"]
    assert m["onnx_sha256"] == _sha256(w8_offline / "model.onnx") == m["files"]["model.onnx"]
    assert m["onnx_bytes"] == (w8_offline / "model.onnx").stat().st_size
    assert m["opset"] == 18
    assert m["input_shapes"] == {"input_ids": [2, SEQ]} and m["output_shapes"] == {"logits": [2, SEQ, 512]}
    assert m["check"]["positions"] == 2 * SEQ and m["check"]["top1_agreement"] == 1.0
    assert m["check"]["max_abs_diff"] <= m["check"]["tolerance"]
    assert m["kv_cache"].startswith("none") and m["weights"].startswith("float32, dequantized from the w8a16")
    assert m["soc_version"] == "Ascend910B2" and m["atc"]["status"] == ATC_NOT_RUN == "not run: atc not on PATH"
    assert m["source"]["quant_manifest_sha256"] == _sha256(w8_dir / "quant_manifest.json")
    assert not [p for p in w8_offline.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_atc_command_file_is_the_exact_command(w8_offline: Path) -> None:
    script = w8_offline / "atc_command.sh"
    assert script.read_text() == (
        "#!/bin/sh\n"
        "# Compile model.onnx into the Ascend offline model model.om (needs CANN: source its set_env.sh first).\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f"atc --framework=5 --model=model.onnx --output=model --soc_version=Ascend910B2 --input_format=ND "
        f"--input_shape=input_ids:2,{SEQ}\n"
    )
    assert os.access(script, os.X_OK)
    readme = (w8_offline / "OFFLINE.md").read_text()
    assert "./atc_command.sh" in readme and "KV cache: none" in readme


def test_w4a16_compiles_with_atc_on_path(w4_dir: Path, tmp_path: Path, fake_atc: Path) -> None:
    out = tmp_path / "out" / "w4"
    result = export_onnx(w4_dir, out, seq_len=16, soc_version="Ascend310P3")
    workdir, *argv = fake_atc.read_text().splitlines()
    assert argv == ["--framework=5", "--model=model.onnx", "--output=model", "--soc_version=Ascend310P3",
                    "--input_format=ND", "--input_shape=input_ids:1,16"]
    assert Path(workdir).parent == out.parent and Path(workdir).name.startswith(".w4.tmp-")  # before publishing
    assert result.atc.status == "ok" and result.atc.om_file == "model.om"
    assert result.atc.om_sha256 == _sha256(out / "model.om")
    assert "ATC run: fake" in (out / "atc.log").read_text()
    assert result.check.top1_agreement == 1.0 and result.check.max_abs_diff <= result.check.tolerance
    assert json.loads((out / "offline_manifest.json").read_text())["source"]["scheme"] == "w4a16"
    assert "model.om" in (out / "OFFLINE.md").read_text()


def test_failed_atc_keeps_the_checked_onnx_and_says_so(w8_dir: Path, tmp_path: Path, fake_atc: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ATC_RC", "3")
    out = tmp_path / "w8"
    with pytest.raises(NpuflowError, match=r"atc exit 3 .*the checked ONNX model is in") as err:
        export_onnx(w8_dir, out, seq_len=8)
    assert err.value.exit_code == 1
    m = json.loads((out / "offline_manifest.json").read_text())
    assert m["atc"]["status"].startswith("failed: exit 3") and m["atc"]["om_file"] is None
    assert not (out / "model.om").exists() and (out / "atc.log").is_file()


def test_large_weights_go_to_external_data(w8_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("npuflow.runtime.offline.EXTERNAL_DATA_BYTES", 0)  # as a 7B model's 27 GB of float32 would
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    out = tmp_path / "w8"
    result = export_onnx(w8_dir, out, seq_len=8)
    assert sorted(result.files) == ["model.onnx", "model.onnx.data"]
    assert all(_sha256(out / name) == sha for name, sha in result.files.items())
    assert (out / "model.onnx.data").stat().st_size > 3e6 > (out / "model.onnx").stat().st_size  # 0.87M float32
    assert result.onnx_bytes == sum((out / name).stat().st_size for name in result.files)
    assert result.check.top1_agreement == 1.0  # onnxruntime found the weights beside model.onnx


def test_a_mismatch_raises_and_publishes_nothing(w8_dir: Path, tmp_path: Path, fake_atc: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("npuflow.runtime.offline.TOP1_MIN", 1.01)  # unreachable: stands in for a wrong export
    with pytest.raises(NpuflowError, match=r"the ONNX model does not match the torch model: max \|diff\| .* "
                                           r"top-1 agreement 1.0000 \(min 1.01\)"):
        export_onnx(w8_dir, tmp_path / "w8", seq_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # the fake atc's; no output, no temp dir
    assert not fake_atc.exists()  # ATC never ran


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("case", "kwargs", "message"),
    [
        ("float", {}, "is not a quantized artifact (no quant_manifest.json)"),
        ("exists", {}, "already exists; choose a new directory"),
        ("w8", {"soc_version": "910B; rm -rf ~"}, "expected AscendNAME"),
        ("w8", {"opset": 15}, "the lowest supported is 18"),
        ("w8", {"seq_len": 4096}, "exceeds the model's max_position_embeddings 256"),
        ("w8", {"batch_size": 0}, "must be >= 1"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(case: str, kwargs: dict, message: str, demo_dir: Path,
                                                     w8_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "offline"
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    args = {"seq_len": 8, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_onnx(demo_dir if case == "float" else w8_dir, out, **args)
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == (["offline"] if case == "exists" else [])


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-dynamic"])
def test_w8a8_is_refused_before_any_work(scheme: str, w8_dir: Path, tmp_path: Path) -> None:
    """The export dequantizes weights to float and has no activation quantization: a W8A8 artifact would come
    out as another model than the one validated. Refused from the manifest's scheme (the config and the
    convert stage ask the same question, core/engines.offline_problem)."""
    from npuflow.core.config import RunConfig

    art = tmp_path / "w8a8"
    shutil.copytree(w8_dir, art)
    manifest = json.loads((art / "quant_manifest.json").read_text())
    (art / "quant_manifest.json").write_text(json.dumps({**manifest, "scheme": scheme}))
    with pytest.raises(ConfigError, match=f"the offline ONNX model cannot carry {scheme}: .* Ascend AMCT"):
        export_onnx(art, tmp_path / "offline", seq_len=8)
    assert not (tmp_path / "offline").exists()
    with pytest.raises(ValueError, match=f"convert.offline: the offline ONNX model cannot carry {scheme}"):
        RunConfig.model_validate({"name": "m", "source": {"uri": "file:///m"}, "quantization": {"scheme": scheme},
                                  "convert": {"offline": {}}})


def test_missing_offline_extra_is_named(w8_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("npuflow.runtime.offline.OFFLINE_DEPS", ("onnx", "npuflow_no_such_module"))
    with pytest.raises(ConfigError, match=r"needs npuflow_no_such_module: pip install 'npuflow\[offline\]'"):
        export_onnx(w8_dir, tmp_path / "offline", seq_len=8)
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_input_exits_2_and_writes_nothing(demo_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from npuflow.cli import main as cli

    out = tmp_path / "offline"
    monkeypatch.setattr(sys, "argv", ["npuflow", "export-onnx", str(demo_dir), "--output", str(out)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert "is not a quantized artifact" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_json(w8_all_dir: Path, tmp_path: Path, fake_atc: Path, monkeypatch, capsys) -> None:
    from npuflow.cli import main as cli

    out = tmp_path / "offline"
    monkeypatch.setattr(sys, "argv", ["npuflow", "export-onnx", str(w8_all_dir), "--output", str(out), "--seq-len", "8",
                                      "--batch-size", "3", "--soc-version", "Ascend910B3", "--json"])
    cli.main()
    data = json.loads(capsys.readouterr().out)  # stdout is the JSON and nothing else
    assert data["atc"] == "ok" and data["opset"] == 18 and data["input_shapes"] == {"input_ids": [3, 8]}
    assert data["top1_agreement"] == 1.0 and data["output"] == str(out)
    assert "--soc_version=Ascend910B3" in fake_atc.read_text().splitlines()
    assert shutil.which("atc") is not None


def test_convert_stage_writes_the_offline_model_into_the_deployable(demo_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """convert.offline set: the deployable carries offline/ (ONNX, atc_command.sh, manifest) in the store."""
    from npuflow.core.artifacts import Deployable, load_manifest
    from npuflow.core.config import ConvertConfig, SourceConfig
    from npuflow.core.store import LocalStore
    from npuflow.quant.stage import quantize
    from npuflow.stages.convert import convert
    from npuflow.stages.fetch import fetch

    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no atc here
    store, cache = LocalStore(tmp_path / "store"), tmp_path / "cache"
    model = fetch(SourceConfig(uri=demo_dir.as_uri()), "tiny", store)
    quantized = quantize(model, QuantizationConfig(), store, cache)
    cfg = ConvertConfig(offline={"seq_len": SEQ, "soc_version": "Ascend910B3"})
    dep = convert(quantized, cfg, store, cache)
    assert dep.offline is not None and dep.offline["atc"]["status"] == ATC_NOT_RUN
    assert dep.offline["soc_version"] == "Ascend910B3" and dep.offline["check"]["top1_agreement"] >= 0.99
    assert {"offline/model.onnx", "offline/atc_command.sh", "offline/offline_manifest.json"} <= set(dep.files)
    root = tmp_path / "store" / dep.key
    assert _sha256(root / "offline" / "model.onnx") == dep.files["offline/model.onnx"].sha256
    assert load_manifest(store, dep.key, Deployable).manifest_sha256 == dep.manifest_sha256  # reads back whole
    assert convert(quantized, cfg, store, cache).cache_hit  # second time: the published deployable
