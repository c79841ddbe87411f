"""The release flow end to end through real Prefect, real MLflow (sqlite) and S3 over HTTP."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import boto3
import pytest

from npuflow.core.config import parse_config
from npuflow.core.errors import GateFailedError, IntegrityError
from npuflow.core.names import Alias
from npuflow.core.settings import Settings
from npuflow.registry import client as registry

pytestmark = pytest.mark.integration

REQUIRED_METRICS = {
    "ppl_reference", "ppl_candidate", "ppl_delta_pct", "top1_agreement", "kl_divergence",
    "ttft_ms_p50", "tpot_ms_p50", "decode_tokens_per_s", "peak_memory_mb", "model_size_mb",
}


def make_config(source: str, **sections):
    """A demo-like config, with a shorter evaluation and benchmark so the suite stays quick."""
    data = {
        "name": "tiny-llama",
        "source": {"uri": source},
        "validation": {"max_tokens": 2048, "seq_len": 128},
        "benchmark": {"input_len": 32, "output_len": 8, "warmup": 1, "iterations": 3},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return parse_config(data)


def mlflow_client():
    return registry.client(Settings().resolved_tracking_uri)


def test_release_registers_champion_then_second_run_is_all_cache_hits(
    prefect_harness, npuflow_home, tiny_source
):
    from npuflow.flows.release import release

    cfg = make_config(tiny_source.as_uri())
    first = release(cfg)
    assert first.registered_new_version and first.decision == "promote" and first.gates_passed
    assert not any(first.cache_hits.values())

    db = npuflow_home / "mlflow.db"
    assert db.is_file()
    c = mlflow_client()
    champion = registry.by_alias(c, "tiny-llama", Alias.CHAMPION)
    assert champion is not None and champion.version == first.version
    assert REQUIRED_METRICS <= set(registry.run_metrics(c, champion))
    for tag in ("source_uri", "quant_scheme", "format", "device", "artifact_sha256", "gates", "rollout"):
        assert champion.tags.get(tag), f"version tag {tag} missing"
    assert champion.tags["gates"] == "passed" and champion.tags["rollout"] == "promoted"
    # the sqlite file itself holds the alias (what `mlflow ui` shows)
    with sqlite3.connect(db) as con:
        assert ("champion", int(first.version)) in con.execute("select alias, version from registered_model_aliases").fetchall()

    _review_with_mlflow_tools(c, champion, npuflow_home.parent / "reviewer")

    second = release(cfg)
    assert second.version == first.version and not second.registered_new_version
    assert second.decision == "already_champion"
    assert all(second.cache_hits.values()), second.cache_hits
    assert len(c.search_model_versions("name='tiny-llama'")) == 1


def _review_with_mlflow_tools(c, champion, dst: Path) -> None:
    """What a reviewer on another machine does with MLflow alone (issue 13 hole 10): read the tags, open the
    report, download the version and load it. Before: a relative source_uri, an empty revision, a version
    whose download held two pointer files (manifest.json, location.json) and no MLmodel."""
    import mlflow

    from npuflow.core.artifacts import QuantizedArtifact, verify_files

    assert champion.tags["source_uri"].startswith("file:///"), champion.tags["source_uri"]  # absolute
    assert Path(champion.tags["source_uri"].removeprefix("file://")).is_dir()
    assert champion.tags["source_revision"] == f"manifest-sha256:{champion.tags['source_manifest_sha256']}"
    text = c.get_model_version(champion.name, champion.version).description
    report = text.split("- Report: ")[1].split("(")[1].split(")")[0]  # the link beside runs:/…/report.html
    assert Path(report.removeprefix("file://")).is_file(), report
    uri = f"models:/{champion.name}@champion"
    mlflow.set_registry_uri(c.tracking_uri)  # models:/ URIs resolve against the registry URI
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
        model = mlflow.pyfunc.load_model(uri, suppress_warnings=True)
    finally:
        mlflow.set_registry_uri("")
    names = {p.name for p in local.iterdir()}
    assert {"MLmodel", "manifest.json", "config.json", "quant_manifest.json", "model.safetensors"} <= names
    published = json.loads((local / "manifest.json").read_bytes())
    quantized = QuantizedArtifact.model_validate({**published, "uri": local.as_uri()})
    verify_files(local, quantized.files)  # the weights themselves, as hashed when they were published
    deployable, _ = registry.deployable_of(c, champion)
    assert quantized.manifest_sha256 == deployable.quantized_manifest_sha256  # the registered chain
    out = model.predict(["the cat sat on", "one two three"], params={"max_tokens": 6})
    assert len(out) == 2 and all(isinstance(t, str) and t.strip() for t in out), out
    again = model.predict(["one two three"], params={"max_tokens": 6})
    assert again == out[1:]  # greedy: the same continuation alone as in a batch


def test_sha256_mismatch_fails_fetch_and_registers_nothing(prefect_harness, npuflow_home, tiny_source):
    from npuflow.flows.release import release

    weights = tiny_source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte; SHA256SUMS still lists the original hash
    weights.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=r"model\.safetensors .*does not match its sha256"):
        release(make_config(tiny_source.as_uri()))
    assert mlflow_client().search_registered_models() == []
    store = npuflow_home / "artifacts"
    assert not list(store.rglob("manifest.json")) if store.exists() else True


def test_failed_gate_is_not_promoted_and_champion_is_unchanged(prefect_harness, npuflow_home, tiny_source):
    from npuflow.flows.release import release

    champion = release(make_config(tiny_source.as_uri()))
    # a different artifact (embeddings and lm_head quantized too) held to a gate it cannot meet
    strict = make_config(
        tiny_source.as_uri(),
        quantization={"ignore": []},
        validation={"gates": {"kl_divergence_max": 0.0}},
    )
    with pytest.raises(GateFailedError, match="kl_divergence"):
        release(strict)

    c = mlflow_client()
    assert registry.by_alias(c, "tiny-llama", Alias.CHAMPION).version == champion.version
    versions = {v.version: v for v in c.search_model_versions("name='tiny-llama'")}
    assert len(versions) == 2
    failed = next(v for k, v in versions.items() if k != champion.version)
    assert failed.tags["gates"] == "failed" and failed.tags["rollout"] == "rejected"
    assert "gates failed" in failed.tags["promotion_reason"]
    assert registry.by_alias(c, "tiny-llama", Alias.CANDIDATE).version == champion.version


def test_s3_store_and_s3_source_put_every_artifact_in_the_bucket(
    prefect_harness, npuflow_home, tiny_source, s3_env, monkeypatch
):
    from npuflow.flows.release import release

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="upstream")
    s3.create_bucket(Bucket="npuflow")
    for f in sorted(tiny_source.iterdir()):
        s3.upload_file(str(f), "upstream", f"tiny-llama/{f.name}")
    monkeypatch.setenv("NPUFLOW_STORE_URI", "s3://npuflow/team-a")

    result = release(make_config("s3://upstream/tiny-llama"))
    assert result.decision == "promote"

    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="npuflow") for o in p.get("Contents", [])]
    manifests = {k.split("/")[3] for k in keys if k.endswith("/manifest.json") and k.startswith("team-a/models/")}
    assert manifests == {"source", "quantized", "deployable", "validation", "benchmark"}
    sources = [k for k in keys if k.startswith("team-a/models/tiny-llama/source/")]
    assert {Path(k).name for k in sources} >= {"config.json", "model.safetensors", "manifest.json"}
    assert any(k.startswith("team-a/mlflow/") and k.endswith("reports/validation.json") for k in keys)
    assert not (npuflow_home / "artifacts").exists(), "nothing may land in the local store"
    # the registered version points at the artifact in the bucket
    champion = registry.by_alias(mlflow_client(), "tiny-llama", Alias.CHAMPION)
    assert champion.tags["artifact_uri"].startswith("s3://npuflow/team-a/models/tiny-llama/deployable/")
    # a reviewer downloads the version from the bucket with MLflow alone: the weights, not pointers
    import mlflow

    assert champion.tags["source_uri"] == "s3://upstream/tiny-llama"
    c = mlflow_client()
    mlflow.set_registry_uri(c.tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts("models:/tiny-llama@champion",
                                                         dst_path=str(npuflow_home.parent / "reviewer")))
    finally:
        mlflow.set_registry_uri("")
    assert c.get_model_version("tiny-llama", champion.version).source.startswith(
        "s3://npuflow/team-a/models/tiny-llama/quantized/")
    assert {"MLmodel", "manifest.json", "model.safetensors", "quant_manifest.json"} <= {p.name for p in local.iterdir()}


def test_release_runs_end_to_end_with_convert_and_benchmark_on_two_tensor_parallel_ranks(
    prefect_harness, npuflow_home, tiny_source, monkeypatch
):
    """benchmark mode tensor-parallel, tp 2 (and convert's smoke test on tp 2): real Prefect, MLflow sqlite,
    torchrun ranks (gloo); the registered benchmark is the ranks' one, with per-rank memory and the
    communication share of TPOT."""
    from npuflow.flows.release import release

    from npuflow.core.artifacts import BenchmarkReport

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the two ranks share the 2 cores
    cfg = make_config(tiny_source.as_uri(), convert={"tp": 2},
                      benchmark={"mode": "tensor-parallel", "tp": 2, "warmup": 1, "iterations": 2})
    result = release(cfg)
    assert result.registered_new_version and result.decision == "promote" and result.gates_passed
    assert REQUIRED_METRICS <= set(result.metrics)
    c = mlflow_client()
    champion = registry.by_alias(c, "tiny-llama", Alias.CHAMPION)
    assert champion is not None and champion.version == result.version
    metrics = registry.run_metrics(c, champion)
    assert metrics["tpot_ms_p50"] == result.metrics["tpot_ms_p50"] > 0
    store = Path(Settings().resolved_store_uri.removeprefix("file://"))
    (manifest,) = store.glob("models/tiny-llama/benchmark/*/manifest.json")
    report = BenchmarkReport.model_validate({**json.loads(manifest.read_text()), "uri": manifest.parent.as_uri()})
    assert report.method["mode"] == "tensor-parallel" and report.method["tp"] == 2
    assert [s.mode for s in report.scenarios] == ["tensor-parallel"]
    assert [r["tp_rank"] for r in report.ranks] == [0, 1] and all(r["peak_rss_mb"] > 0 for r in report.ranks)
    (s,) = report.scenarios
    assert s.comm_ms_per_step is not None and 0 < s.comm_share_pct < 100
    assert "Communication share of TPOT" in (manifest.parent / "report.md").read_text()
