"""Registry reads fail closed (MLflow on sqlite, and a tracking URI where nothing listens); the serving
pool keeps what it serves through a registry error."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from npuflow.core.artifacts import Deployable
from npuflow.core.config import PromotionConfig
from npuflow.core.errors import NpuflowError, RegistryError
from npuflow.core.names import Alias
from npuflow.registry import client as registry
from npuflow.registry.promotion import promote

NAME = "faults"
METRICS = {"ppl_candidate": 2.0, "ppl_reference": 2.0, "ppl_delta_pct": 0.0, "top1_agreement": 1.0,
           "kl_divergence": 0.0, "tpot_ms_p50": 1.0, "ttft_ms_p50": 1.0}


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the socket is: nothing listens


@pytest.fixture
def fast_fail(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture
def sqlite_client(tmp_path: Path):
    return registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _line(c) -> registry.ModelVersion:
    """champion v1, candidate v2 (gates passed), each with a run and the same metrics."""
    exp = registry.experiment_id(c, NAME, None)
    c.create_registered_model(NAME)
    for i in (1, 2):
        run = c.create_run(exp)
        for k, v in METRICS.items():
            c.log_metric(run.info.run_id, k, v)
        c.create_model_version(NAME, source=f"runs:/{run.info.run_id}/deployable", run_id=run.info.run_id,
                               tags={"gates": "passed", "artifact_sha256": str(i) * 64, "rollout": "registered"})
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "1")
    c.set_registered_model_alias(NAME, Alias.CANDIDATE, "2")
    return registry.by_alias(c, NAME, Alias.CANDIDATE)


def test_not_found_means_absent(sqlite_client) -> None:
    c = sqlite_client
    assert registry.by_alias(c, "nope", Alias.CHAMPION) is None  # RESOURCE_DOES_NOT_EXIST
    assert registry.aliases(c, "nope") == {}
    assert registry.find_by_artifact(c, "nope", "0" * 64) is None
    c.create_registered_model("empty")
    assert registry.by_alias(c, "empty", Alias.CHAMPION) is None  # INVALID_PARAMETER_VALUE: alias not found


def test_every_read_fails_closed_when_mlflow_is_down(fast_fail) -> None:
    """Issue 13 hole 1: before the fix each of these answered "not there" (None, {}, None)."""
    uri = _dead_uri()
    c = registry.client(uri)
    for what, read in [("reading alias m@champion", lambda: registry.by_alias(c, "m", Alias.CHAMPION)),
                       ("reading the aliases of m", lambda: registry.aliases(c, "m")),
                       ("searching m versions", lambda: registry.find_by_artifact(c, "m", "0" * 64))]:
        with pytest.raises(RegistryError, match=rf"MLflow at {uri} failed {what}") as ei:
            read()
        assert "nothing was decided or changed" in str(ei.value) and "MLFLOW_TRACKING_URI" in str(ei.value)


def test_promotion_against_an_unreachable_champion_read_changes_nothing(sqlite_client, fast_fail) -> None:
    """The candidate is read from the real registry; the champion read then meets a registry that is down."""
    cand = _line(sqlite_client)
    with pytest.raises(RegistryError):
        promote(registry.client(_dead_uri()), cand, PromotionConfig(strategy="direct"), 5.0, approved_by="t")
    assert registry.aliases(sqlite_client, NAME) == {Alias.CHAMPION: "1", Alias.CANDIDATE: "2"}
    assert sqlite_client.get_model_version(NAME, "2").tags["rollout"] == "registered"


def test_promotion_with_a_real_registry_still_promotes(sqlite_client) -> None:
    cand = _line(sqlite_client)
    d = promote(sqlite_client, cand, PromotionConfig(strategy="direct"), 5.0, approved_by="t")
    assert d.action == "promote" and d.champion_version == "1"
    assert registry.aliases(sqlite_client, NAME)[Alias.CHAMPION] == "2"


def test_a_champion_whose_run_is_gone_is_an_error_not_empty_metrics(sqlite_client) -> None:
    cand = _line(sqlite_client)
    champ = registry.by_alias(sqlite_client, NAME, Alias.CHAMPION)
    sqlite_client.delete_run(champ.run_id)
    sqlite_client._tracking_client.store._hard_delete_run(champ.run_id)  # the run is gone from the database
    with pytest.raises(RegistryError, match="no longer exists"):
        promote(sqlite_client, cand, PromotionConfig(strategy="direct"), 5.0, approved_by="t")
    assert registry.aliases(sqlite_client, NAME)[Alias.CHAMPION] == "1"


# ---- the serving pool: a registry blip never drops what serves -----------------------------------------


def _loader(quantized_llama_dir: Path):
    from npuflow.runtime.backends import cpu
    from npuflow.runtime.engine import Engine
    from npuflow.runtime.loader import load_quantized
    from npuflow.serving.generation import Batcher
    from npuflow.serving.loaded import LoadedModel

    model = load_quantized(quantized_llama_dir, cpu, torch.float32)

    def load(version):
        dep = Deployable(uri="file:///x", key="k", name=NAME, quantized_manifest_sha256="q", quantized_key="q",
                         device="cpu", device_name="cpu", runtime="npuflow-eager", dtype="float32", kernels={},
                         versions={}, smoke_logits_sha256="s")
        engine = Engine(model, 64, slots=1)
        return LoadedModel(version=version, deployable=dep, model=model, engine=engine,
                           batcher=Batcher(engine, version.version), tokenizer=None, device=torch.device("cpu"),
                           context=64, eos=frozenset({0}))
    return load


def test_the_pool_keeps_champion_and_challenger_through_a_registry_error(sqlite_client, quantized_llama_dir,
                                                                          fast_fail) -> None:
    from npuflow.serving.options import ServeOptions
    from npuflow.serving.pool import ModelPool

    _line(sqlite_client)
    where = {"c": sqlite_client}
    opts = ServeOptions(name=NAME, tracking_uri="x", store_uri="x", cache_dir=Path("/nonexistent"))
    pool = ModelPool(opts, resolve=lambda a: registry.by_alias(where["c"], NAME, a), load=_loader(quantized_llama_dir))
    try:
        pool.reload()
        assert (pool.champion.model.label, pool.challenger.model.label) == ("1", "2")
        where["c"] = registry.client(_dead_uri())  # MLflow goes away
        out = pool.reload()
        assert (pool.champion.model.label, pool.challenger.model.label) == ("1", "2")  # nothing dropped
        assert pool.challenger.reason is None
        assert out["errors"] and "registry unavailable" in out["errors"][0]
        assert pool.events[-1]["event"].startswith("registry unavailable")
        fresh = ModelPool(opts, resolve=lambda a: registry.by_alias(where["c"], NAME, a), load=lambda v: None)
        with pytest.raises(RegistryError, match="MLflow at"):  # an outage, not "no champion alias"
            fresh.reload()
        assert isinstance(RegistryError("x"), NpuflowError)
    finally:
        pool.close() if hasattr(pool, "close") else None
        for s in (pool.champion, pool.challenger):
            if s.model is not None and s.model.batcher is not None:
                s.model.batcher.close()


# ---- alias moves killed part-way (SIGKILL, a real subprocess) converge on the next run (hole 3) -----------

KILLER = '''
import os, signal, sys
from mlflow import MlflowClient
from npuflow.registry import client as registry
from npuflow.registry.promotion import PromotionDecision, apply_promotion

uri, method, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls, real = [0], getattr(MlflowClient, method)

def kill_on_nth(self, *a, **kw):  # the process dies at the MLflow API boundary, as a crash would
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **kw)

setattr(MlflowClient, method, kill_on_nth)
c = registry.client(uri)
cand = registry.by_alias(c, "faults", "candidate")
decision = PromotionDecision(action="promote", reasons=["rollout passed"], candidate_version=cand.version,
                             champion_version="1")
apply_promotion(c, cand, decision, approved_by="the rollout")  # what the rollout's final promotion does
print("not killed")
'''


@pytest.mark.parametrize(("method", "nth", "half_done"), [
    ("set_registered_model_alias", 1, {Alias.CHAMPION: "1", Alias.CANDIDATE: "2"}),  # intent written, no alias
    ("set_registered_model_alias", 2, {Alias.CHAMPION: "1", Alias.PREVIOUS: "1", Alias.CANDIDATE: "2"}),  # between
    ("delete_model_version_tag", 1, {Alias.CHAMPION: "2", Alias.PREVIOUS: "1", Alias.CANDIDATE: "2"}),  # after both
])
def test_an_alias_move_killed_part_way_converges_on_the_next_run(tmp_path: Path, method: str, nth: int,
                                                                 half_done: dict) -> None:
    """Before the fix a kill between the writes left champion == previous == 1 and the rerun (strategy
    rollout) read v1 as the champion and started a new staged rollout from that state."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = registry.client(uri)
    cand = _line(c)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), uri, method, str(nth)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-2000:]
    assert registry.aliases(c, NAME) == half_done
    assert registry.ALIAS_INTENT in c.get_model_version(NAME, "2").tags  # the record the rerun repairs from
    # the rerun: the release's promote step again, this time with the staged-rollout strategy
    d = promote(c, cand, PromotionConfig(strategy="rollout"), 5.0, approved_by="t")
    assert d.action == "already_champion"
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "2", Alias.PREVIOUS: "1", Alias.CANDIDATE: "2"}
    assert registry.ALIAS_INTENT not in c.get_model_version(NAME, "2").tags


def test_a_half_done_move_rolled_back_since_is_dropped_not_finished(sqlite_client) -> None:
    import json

    c = sqlite_client
    _line(c)
    c.set_model_version_tag(NAME, "2", registry.ALIAS_INTENT, json.dumps(
        {"wanted": {"previous": "1", "champion": "2"}, "from": {"previous": None, "champion": "1"}, "at": 0}))
    c.set_model_version_tag(NAME, "2", "rollout", "rolled_back")  # a person rolled it back meanwhile
    assert registry.repair_alias_moves(c, NAME)[0].startswith("dropped")
    assert registry.aliases(c, NAME)[Alias.CHAMPION] == "1"


def test_aliases_moved_elsewhere_since_are_not_overwritten(sqlite_client) -> None:
    import json

    c = sqlite_client
    _line(c)
    c.create_model_version(NAME, source="file:///x", tags={"gates": "passed"})
    c.set_model_version_tag(NAME, "2", "rollout", "promoted")
    c.set_model_version_tag(NAME, "2", registry.ALIAS_INTENT, json.dumps(
        {"wanted": {"previous": "1", "champion": "2"}, "from": {"previous": None, "champion": "1"}, "at": 0}))
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "3")  # someone else's move
    with pytest.raises(RegistryError, match="someone moved them since"):
        registry.repair_alias_moves(c, NAME)
    assert registry.aliases(c, NAME)[Alias.CHAMPION] == "3"


def test_the_release_rollback_hook_restores_only_what_it_wrote(sqlite_client) -> None:
    """register -> promote failed after champion moved to 2; meanwhile a person set candidate elsewhere."""
    c = sqlite_client
    _line(c)
    c.create_model_version(NAME, source="file:///x", tags={"gates": "passed"})
    before = {Alias.CHAMPION: "1", Alias.CANDIDATE: "1"}
    c.set_registered_model_alias(NAME, Alias.PREVIOUS, "1")  # what this transaction wrote: previous, champion
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "2")
    c.set_registered_model_alias(NAME, Alias.CANDIDATE, "3")  # someone else's, since
    assert registry.restore_aliases(c, NAME, before, ours="2") == {Alias.CHAMPION: "1", Alias.PREVIOUS: None}
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "1", Alias.CANDIDATE: "3"}


def test_the_rollback_hook_never_undoes_a_rollback_made_meanwhile(sqlite_client) -> None:
    c = sqlite_client
    _line(c)
    before = {Alias.CHAMPION: "1", Alias.CANDIDATE: "2"}
    c.set_registered_model_alias(NAME, Alias.PREVIOUS, "1")
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "2")
    c.delete_registered_model_alias(NAME, Alias.PREVIOUS)  # `npuflow rollback` ran meanwhile ...
    c.set_registered_model_alias(NAME, Alias.CHAMPION, "1")  # ... champion 1 again, no previous
    c.delete_registered_model_alias(NAME, Alias.CANDIDATE)
    assert registry.restore_aliases(c, NAME, before, ours="2") == {}  # nothing it wrote is left
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "1"}  # the rollback's state, untouched
