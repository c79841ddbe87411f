"""One writer per model line (issue 13 hole 2): the store's lock, compare-before-write, and concurrent
releases of one model line as real processes against MLflow on sqlite and a local or S3 store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from npuflow.core.locks import LockTimeoutError, lock_key, model_line_lock
from npuflow.core.names import Alias
from npuflow.core.store import open_store
from npuflow.registry import client as registry
from npuflow.registry.promotion import AliasMovedError, PromotionDecision, apply_promotion

NAME = "line"

# One release's registry part, as flows/release.py runs it: under the lock, log the run, register the
# artifact (once per artifact), promote directly against the champion. argv: tracking store sha lock(0/1)
WORKER = r'''
import json, sys
from npuflow.core.artifacts import Deployable, GateResult, ModelArtifact, QuantizedArtifact, ValidationReport
from npuflow.core.config import PromotionConfig, parse_config
from npuflow.core.locks import model_line_lock
from npuflow.core.store import open_store
from npuflow.registry import client as registry
from npuflow.registry.promotion import promote
from contextlib import nullcontext

tracking, store_uri, sha, locked = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
name = "line"
cfg = parse_config({"name": name, "source": {"uri": "file:///nowhere"}})
model = ModelArtifact(uri="file:///m", key="m", name=name, source_uri="file:///nowhere", files={}, hf_config={})
quant = QuantizedArtifact(uri="file:///q", key="q", name=name, source_manifest_sha256="1" * 64, scheme="w8a16",
                          format="native", files={}, quantized_tensors=1, float_tensors=1, size_bytes=1)
dep = Deployable(uri="file:///d", key="d-" + sha[:8], name=name, quantized_manifest_sha256=sha,
                 quantized_key="q", device="cpu", device_name="cpu", runtime="npuflow-eager", dtype="float32",
                 kernels={}, versions={}, smoke_logits_sha256="2" * 64)
metrics = {"ppl_candidate": 2.0, "ppl_reference": 2.0, "ppl_delta_pct": 0.0, "top1_agreement": 1.0,
           "kl_divergence": 0.0}
val = ValidationReport(uri="file:///v", key="v", deployable_manifest_sha256=dep.manifest_sha256,
                       eval_text_sha256="4" * 64, eval_tokens=100, metrics=metrics,
                       gates={"ppl": GateResult(value=0.0, threshold=1.0, op="<=", passed=True)})
c = registry.client(tracking)
lock = model_line_lock(open_store(store_uri), name, "test release") if locked else nullcontext()
with lock:
    exp = registry.experiment_id(c, name, None)
    run_id = registry.log_pipeline_run(c, exp, cfg, dep, val, None, None)
    v = registry.register(c, run_id, model, quant, dep, val)
    d = promote(c, v, PromotionConfig(strategy="direct"), 5.0, approved_by="test")
print(json.dumps({"version": v.version, "new": v.newly_registered, "action": d.action,
                  "champion_before": d.champion_version}))
'''


def _releases(tmp_path: Path, store_uri: str, shas: list[str], locked: bool = True) -> list[dict]:
    """len(shas) releases started together, each in its own process; their results."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.client(tracking).search_registered_models()  # the schema is created once, before the race
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    procs = [subprocess.Popen([sys.executable, str(script), tracking, store_uri, sha, "1" if locked else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for sha in shas]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_ten_concurrent_releases_of_one_artifact_register_one_version_and_one_champion(tmp_path: Path) -> None:
    """Before the lock, check-then-create let several of them register a version each."""
    store = (tmp_path / "store").as_uri()
    out = _releases(tmp_path, store, ["a" * 64] * 10)
    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = c.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 1, [v.version for v in versions]
    assert {o["version"] for o in out} == {"1"} and sum(o["new"] for o in out) == 1
    assert sorted(o["action"] for o in out) == ["already_champion"] * 9 + ["promote"]
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "1", Alias.CANDIDATE: "1"}


def test_concurrent_releases_of_different_artifacts_each_compare_with_the_champion_before_them(
        tmp_path: Path) -> None:
    """Four artifacts at once: four versions, and every promotion was decided against the champion that
    was in place when it wrote (the chain of champion_before is the order of promotions)."""
    store = (tmp_path / "store").as_uri()
    out = _releases(tmp_path, store, [c * 64 for c in "abcd"])
    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(c.search_model_versions(f"name='{NAME}'")) == 4
    promoted = [o for o in out if o["action"] == "promote"]
    befores = [o["champion_before"] for o in promoted]
    assert befores.count(None) == 1  # exactly one release saw no champion
    chain = {o["champion_before"]: o["version"] for o in promoted}
    v, seen = chain[None], 1  # follow champion_before -> version: one chain through every promotion
    while v in chain:
        v, seen = chain[v], seen + 1
    assert seen == len(promoted) and registry.aliases(c, NAME)[Alias.CHAMPION] == v


@pytest.mark.integration
def test_concurrent_releases_with_an_s3_store_lock(tmp_path: Path, s3_env) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket="locks")
    out = _releases(tmp_path, "s3://locks/npuflow", ["e" * 64] * 6)
    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(c.search_model_versions(f"name='{NAME}'")) == 1 and {o["version"] for o in out} == {"1"}
    assert not open_store("s3://locks/npuflow").exists(lock_key(NAME))  # released


def test_the_local_lock_excludes_and_is_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from npuflow.core.locks import model_line_lock; from npuflow.core.store import "
        f"open_store; s = open_store({store.uri!r})\nwith model_line_lock(s, 'line', 'holder'):\n"
        "    print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError, match="holder"), model_line_lock(store, NAME, "waiter", wait_s=0.5):
            pass
        holder.kill()  # SIGKILL: no cleanup runs; the kernel releases the flock
        holder.wait()
        with model_line_lock(store, NAME, "after", wait_s=5):
            pass
    finally:
        holder.kill()


@pytest.mark.integration
def test_an_s3_lease_whose_holder_died_is_taken_over_by_one_waiter(s3_env) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket="lease")
    store = open_store("s3://lease")
    body = json.dumps({"owner": "dead:1", "what": "killed release", "since": "x", "expires_at": time.time() + 1})
    store.client.put_object(Bucket="lease", Key=lock_key(NAME), Body=body.encode())  # a holder that died
    with pytest.raises(LockTimeoutError, match="killed release"), model_line_lock(store, NAME, "w", wait_s=0.3):
        pass
    time.sleep(1.2)  # its lease runs out
    inside, errors = [], []

    def waiter(i: int) -> None:
        try:
            with model_line_lock(store, NAME, f"waiter {i}", wait_s=20):
                inside.append(i)
                assert len(inside) == 1  # never two at once
                time.sleep(0.3)
                inside.remove(i)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_promotion_whose_champion_moved_after_the_comparison_writes_nothing(tmp_path: Path) -> None:
    """The rollout compared against champion v1; during its approval wait a rollback made v3 champion.
    Before compare-before-write the end of the rollout put v2 over it."""
    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c.create_registered_model(NAME)
    for _ in range(3):
        c.create_model_version(NAME, source="runs:/x/deployable", tags={"gates": "passed"})
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "1")
    candidate = registry.ModelVersion.model_validate({**registry.by_alias(c, NAME, Alias.CHAMPION).model_dump(),
                                                      "version": "2"})
    decision = PromotionDecision(action="promote", reasons=["staged rollout passed"], candidate_version="2",
                                 champion_version="1")
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "3")  # someone else moved it meanwhile
    with pytest.raises(AliasMovedError, match="champion moved from version 1 to version 3"):
        apply_promotion(c, candidate, decision, approved_by="t")
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "3"}
    assert "rollout" not in c.get_model_version(NAME, "2").tags


def test_the_rollout_refuses_a_candidate_another_release_moved(tmp_path: Path, monkeypatch) -> None:
    """The release passes its version; `candidate` pointing at another release's version is refused."""
    from npuflow.tasks.rollout import resolve_versions_task

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("NPUFLOW_TRACKING_URI", uri)
    c = registry.client(uri)
    c.create_registered_model(NAME)
    for _ in range(3):
        c.create_model_version(NAME, source="runs:/x/deployable", tags={"gates": "passed"})
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "1")
    c.set_registered_model_alias(NAME, Alias.CANDIDATE, "3")  # release B moved it after release A registered 2
    with pytest.raises(Exception, match="registered version 2 but `candidate` now points at version 3"):
        resolve_versions_task.fn(NAME, "2")


def test_a_version_whose_artifacts_are_gone_is_registered_anew_and_takes_over(tmp_path: Path) -> None:
    """Issue 13 hole 8: after the store was lost a rerun said `already registered: cache hit` and
    `already_champion`, exited 0, and the champion could not be loaded (its run's deployable/ was gone)."""
    import shutil

    from npuflow.core.artifacts import (
        Deployable,
        GateResult,
        ModelArtifact,
        QuantizedArtifact,
        ValidationReport,
    )
    from npuflow.core.config import PromotionConfig, parse_config
    from npuflow.core.names import Tag
    from npuflow.registry.promotion import promote

    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "store" / "mlflow"  # the run artifacts live in the store, as in a release
    exp = registry.experiment_id(c, NAME, runs.as_uri())
    cfg = parse_config({"name": NAME, "source": {"uri": "file:///nowhere"}})
    model = ModelArtifact(uri="file:///m", key="m", name=NAME, source_uri="file:///nowhere", files={}, hf_config={})
    quant = QuantizedArtifact(uri="file:///q", key="q", name=NAME, source_manifest_sha256="1" * 64,
                              scheme="w8a16", format="native", files={}, quantized_tensors=1, float_tensors=1,
                              size_bytes=1)
    dep = Deployable(uri="file:///d", key="d", name=NAME, quantized_manifest_sha256="9" * 64, quantized_key="q",
                     device="cpu", device_name="cpu", runtime="npuflow-eager", dtype="float32", kernels={},
                     versions={}, smoke_logits_sha256="2" * 64)
    val = ValidationReport(uri="file:///v", key="v", deployable_manifest_sha256=dep.manifest_sha256,
                           eval_text_sha256="4" * 64, eval_tokens=100, metrics={"ppl_candidate": 2.0},
                           gates={"ppl": GateResult(value=0.0, threshold=1.0, op="<=", passed=True)})

    def release() -> tuple[registry.ModelVersion, str]:
        run_id = registry.log_pipeline_run(c, exp, cfg, dep, val, None, None)
        v = registry.register(c, run_id, model, quant, dep, val)
        return v, promote(c, v, PromotionConfig(strategy="rollout"), 5.0, approved_by="t").action

    v1, action = release()
    assert (v1.version, action) == ("1", "promote")
    shutil.rmtree(runs)  # the store is lost (the bucket recreated empty)
    v2, action = release()
    assert (v2.version, v2.newly_registered, action) == ("2", True, "promote")  # before: "1", False, already_champion
    assert Tag.ARTIFACTS_LOST in c.get_model_version(NAME, "1").tags
    assert registry.aliases(c, NAME)[Alias.CHAMPION] == "2" and registry.deployable_of(c, v2)[0].name == NAME
    v3, action = release()  # and the next rerun is a cache hit again
    assert (v3.version, v3.newly_registered, action) == ("2", False, "already_champion")


def test_a_rollback_whose_aliases_moved_meanwhile_writes_no_alias(tmp_path: Path, monkeypatch) -> None:
    """Champion v2 (previous v1) is rolled back while another writer makes v3 champion between the
    rollback's read and its write: the rollback writes no alias, names what moved; v3 stays champion."""
    from npuflow.registry import rollback as rb
    from npuflow.registry.promotion import AliasMovedError

    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c.create_registered_model(NAME)
    for _ in range(3):
        c.create_model_version(NAME, source="runs:/x/deployable", tags={"gates": "passed"})
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "2")
    c.set_registered_model_alias(NAME, Alias.PREVIOUS, "1")
    tag = registry.tag_version

    def tag_and_race(cl, version, tags):
        tag(cl, version, tags)
        c.set_registered_model_alias(NAME, Alias.CHAMPION, "3")  # the other writer, after the first read

    monkeypatch.setattr(registry, "tag_version", tag_and_race)
    said = r"rollback ran \(it read champion version 2, previous version 1, MLflow now reads champion version 3\)"
    with pytest.raises(AliasMovedError, match=said):
        rb.rollback(c, NAME, "bad canary", "tester")
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "3", Alias.PREVIOUS: "1"}
    monkeypatch.setattr(registry, "tag_version", tag)
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "2")  # the race over: the same call now rolls back
    assert rb.rollback(c, NAME, "bad canary", "tester").champion == "1"
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "1"}
