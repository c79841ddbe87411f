"""The `npuflow` command as a user runs it: exit codes, messages, and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def npuflow(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUFLOW_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "npuflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**full_env, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name: x\nsource: {uri: file:///m}\nbogus: 1\n", "bogus: unknown key; allowed here: benchmark, convert"),
        ("name: x\nsource: {uri: file:///m}\nconvert: {device: tpu}\n", "convert.device: Input should be 'cpu', 'cuda' or 'npu'"),
        ("name: x\nsource: {uri: ftp://m}\n", "unknown source scheme"),
        ("name: x\n", "source: required but missing"),
        ("name: x\nsource: {uri: file:///m}\nbenchmark: {batch_size: many}\n", "benchmark.batch_size"),
    ],
)
def test_bad_config_exits_2_names_the_field_and_writes_nothing(tmp_path, body, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    proc = npuflow("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert proc.stderr.count("npuflow: error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_absent_device_fails_fast_with_the_reason(tmp_path):
    cfg = tmp_path / "npu.yaml"
    cfg.write_text("name: x\nsource: {uri: 'hf://meta-llama/Llama-2-7b-hf@main'}\nconvert: {device: npu}\n")
    proc = npuflow("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "device 'npu' is not available here: torch_npu is not installed" in proc.stderr
    assert "CANN" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npu.yaml"]


def test_missing_config_file(tmp_path):
    proc = npuflow("run", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "config file not found: nope.yaml" in proc.stderr


def test_stage_commands_standalone(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    proc = npuflow("quantize", str(tiny_model_dir), "--output", str(out), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scheme"] == "w8a16" and (out / "quant_manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    again = npuflow("quantize", str(tiny_model_dir), "--output", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr

    dep = tmp_path / "deployable"
    conv = npuflow("convert", str(out), "--device", "cpu", "--output", str(dep), "--json", cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr
    assert json.loads(conv.stdout)["kernels"]["linear_w8a16"]
    assert json.loads((dep / "deployable.json").read_text())["device"] == "cpu"

    npu = npuflow("convert", str(out), "--device", "npu", "--output", str(tmp_path / "npu"), cwd=tmp_path)
    assert npu.returncode == 2 and "torch_npu" in npu.stderr
    assert not (tmp_path / "npu").exists()

    bench = tmp_path / "bench.json"
    b = npuflow("benchmark", str(out), "--input-len", "16", "--output-len", "4", "--iterations", "2",
                "--output", str(bench), cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    metrics = json.loads(bench.read_text())
    assert metrics["tpot_ms_p50"] > 0 and metrics["decode_tokens_per_s"] > 0
    assert metrics["energy"].startswith("not measured")
    assert metrics["runtime"] == "npuflow-graph"  # the converted model, decode step compiled
    assert metrics["first_run_s"]["single"]  # compile time is reported, not hidden in the warm-up


def test_benchmark_runtimes_side_by_side_and_bad_input(tiny_model_dir, tmp_path):
    """hf-eager (transformers, fp32, unquantized) and npuflow (quantized, engine) write the same JSON keys."""
    q = tmp_path / "q"
    assert npuflow("quantize", str(tiny_model_dir), "--output", str(q), cwd=tmp_path).returncode == 0
    common = ["--input-len", "16", "--output-len", "6", "--warmup", "1", "--iterations", "2"]
    results = {}
    for runtime, model, extra in (("hf-eager", tiny_model_dir, []), ("npuflow", q, ["--eager"])):
        out = tmp_path / f"{runtime}.json"
        proc = npuflow("benchmark", str(model), "--runtime", runtime, *extra, *common, "--output", str(out),
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        results[runtime] = json.loads(out.read_text())
    keys = {"decode_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "peak_memory_mb", "model_size_mb"}
    for runtime, data in results.items():
        assert keys <= set(data), runtime
    assert (results["hf-eager"]["runtime"], results["hf-eager"]["dtype"]) == ("hf-eager", "float32")
    assert results["npuflow"]["runtime"] == "npuflow-eager"
    # the trained demo model's greedy continuation survives w8a16 and the engine's static cache
    assert results["npuflow"]["greedy_tokens"] == results["hf-eager"]["greedy_tokens"]

    for args, message in (
        (["benchmark", str(q), "--runtime", "hf-eager"], "runs plain transformers on the unquantized model"),
        (["benchmark", str(tiny_model_dir)], "not a quantized model directory"),
        (["benchmark", str(q), "--runtime", "llama.cpp"], "unknown --runtime 'llama.cpp'"),
        (["benchmark", str(q), "--device", "npu"], "torch_npu is not installed"),
    ):
        proc = npuflow(*args, "--output", str(tmp_path / "never.json"), cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "never.json").exists()


def test_a_failed_stage_is_one_clear_message_without_tracebacks(tmp_path):
    """Issue 13 hole 9: a release whose source is not there printed two Prefect tracebacks (~80 lines)
    before its message. Now: a line per failed attempt, no traceback, the message last, exit 1."""
    cfg = tmp_path / "gone.yaml"
    cfg.write_text(f"name: gone\nsource: {{uri: '{(tmp_path / 'nowhere').as_uri()}'}}\n")
    proc = npuflow("run", str(cfg), cwd=tmp_path, env={"NPUFLOW_HOME": str(tmp_path / "home")})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("npuflow: error:") == 1
    assert len(proc.stderr.splitlines()) < 25, proc.stderr
