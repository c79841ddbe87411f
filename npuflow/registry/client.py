"""MLflow tracking and model registry: one run per pipeline run, one version per distinct artifact."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

import npuflow
from npuflow.bench.report import render, scenario_metrics
from npuflow.core.artifacts import (
    BenchmarkReport,
    Deployable,
    ModelArtifact,
    QuantizedArtifact,
    ValidationReport,
)
from npuflow.core.config import RunConfig, flatten
from npuflow.core.errors import IntegrityError, NpuflowError, RegistryError
from npuflow.core.names import Alias, Tag

log = logging.getLogger("npuflow.registry")

# MLflow's answer when a registered model, a version or an alias does not exist. A missing alias is
# INVALID_PARAMETER_VALUE "Registered model alias X not found." (mlflow 3.17, sqlalchemy and REST stores).
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def is_not_found(err: Exception) -> bool:
    """True only for MLflow's "does not exist" answers; timeouts, 5xx, auth and the rest are not."""
    code = getattr(err, "error_code", None)
    if code == _NOT_FOUND:
        return True
    return code == "INVALID_PARAMETER_VALUE" and " alias " in f" {err} " and "not found" in str(err)


def registry_error(c, what: str, err: Exception) -> RegistryError:
    """The fail-closed message: which service, what failed, what to check; nothing was changed."""
    uri = getattr(c, "tracking_uri", None) or "the configured tracking URI"
    code = getattr(err, "error_code", None) or type(err).__name__
    return RegistryError(
        f"MLflow at {uri} failed {what} ({code}: {str(err)[:300]}). The registry's answer is unknown, so "
        "nothing was decided or changed; check that the MLflow server is up and reachable "
        "(MLFLOW_TRACKING_URI), its credentials and its database, then re-run",
        retryable=code in _TRANSIENT_CODES or isinstance(err, (OSError, ConnectionError, TimeoutError)),
    )


# MLflow error codes of an unreachable, overloaded or failing service (the REST client reports a
# connection failure as INTERNAL_ERROR); denied or bad requests are not among them
_TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                              "DEADLINE_EXCEEDED", "ABORTED"})


def _read(c, what: str, call, absent):
    """call(), or `absent` when MLflow says not found; any other failure is a RegistryError."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as err:
        if is_not_found(err):
            return absent
        raise registry_error(c, what, err) from None
    except (OSError, ConnectionError, TimeoutError) as err:
        raise registry_error(c, what, err) from None


class ModelVersion(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    newly_registered: bool = False
    created_s: int | None = None  # registration time, Unix seconds


def client(tracking_uri: str):
    """An MlflowClient for tracking and registry at tracking_uri (sqlite file or server)."""
    import logging as _logging

    from mlflow import MlflowClient

    _logging.getLogger("alembic").setLevel(_logging.WARNING)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(c, name: str, artifact_location: str | None) -> str:
    exp = c.get_experiment_by_name(f"npuflow/{name}")
    return exp.experiment_id if exp else c.create_experiment(f"npuflow/{name}", artifact_location=artifact_location)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(npuflow.__file__).parent), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def log_pipeline_run(
    c,
    exp_id: str,
    config: RunConfig,
    deployable: Deployable,
    validation: ValidationReport,
    benchmark: BenchmarkReport | None,
    flow_run_id: str | None = None,
) -> str:
    """The MLflow run of one pipeline run: config as params, DESIGN.md metrics, reports as artifacts."""
    tags = {
        "npuflow.git_sha": git_sha(),
        "npuflow.version": npuflow.__version__,
        "device": deployable.device,
        "device_name": deployable.device_name,
        **{f"version.{k}": v for k, v in deployable.versions.items()},
    }
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run = c.create_run(exp_id, tags=tags, run_name=f"{config.name}-{deployable.manifest_sha256[:8]}")
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
    metrics = dict(validation.metrics)
    if benchmark is not None:
        metrics |= benchmark.metrics
        metrics |= scenario_metrics(benchmark)  # every scenario, suffixed: tpot_ms_p50.bs4_in512, ...
    c.log_batch(rid, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()], params=params)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "validation.json").write_text(validation.model_dump_json(indent=2))
        if benchmark is not None:
            (d / "benchmark.json").write_text(benchmark.model_dump_json(indent=2))
            champion = by_alias(c, config.name, Alias.CHAMPION)  # before this run's version exists
            render(benchmark, d, champion=run_metrics(c, champion) if champion else None,
                   champion_label=f"champion v{champion.version}" if champion else "champion",
                   tpot_regression_pct=config.benchmark.tpot_regression_pct)  # report.md/.html + PNGs
        (d / "config.json").write_text(config.model_dump_json(indent=2))
        c.log_artifacts(rid, str(d), "reports")
        dep = d / "deployable"
        dep.mkdir()
        (dep / "manifest.json").write_bytes(deployable.manifest_bytes())
        (dep / "location.json").write_text(json.dumps({"uri": deployable.uri, "key": deployable.key}))
        c.log_artifacts(rid, str(dep), "deployable")
    c.set_terminated(rid)
    return rid


def render_run_report(c, run_id: str, out_dir: Path):
    """Re-render a pipeline run's benchmark report from its MLflow artifacts, against the model line's
    champion (or `previous`, when this run is the champion). Returns (files, regression gate or None)."""
    from mlflow.exceptions import MlflowException

    from npuflow.bench.report import regression_gate

    try:
        run = c.get_run(run_id)
    except MlflowException as err:
        raise NpuflowError(f"no MLflow run {run_id!r} at this tracking URI: {str(err)[:200]}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(c.download_artifacts(run_id, "reports/benchmark.json", tmp))
            report = BenchmarkReport.model_validate_json(path.read_text())
        except (MlflowException, OSError, ValueError) as err:
            raise NpuflowError(
                f"run {run_id} has no readable benchmark report (reports/benchmark.json): {str(err)[:200]}; "
                "runs whose gates failed are not benchmarked"
            ) from None
    name = run.data.params.get("name", "")
    pct = float(run.data.params.get("benchmark.tpot_regression_pct", 5.0))
    other, label = by_alias(c, name, Alias.CHAMPION), Alias.CHAMPION
    if other is not None and other.run_id == run_id:
        other, label = by_alias(c, name, Alias.PREVIOUS), Alias.PREVIOUS
    theirs = run_metrics(c, other) if other else None
    files = render(report, out_dir, champion=theirs, tpot_regression_pct=pct,
                   champion_label=f"{label} v{other.version}" if other else label)
    return files, regression_gate(dict(run.data.metrics), theirs, pct) if theirs else None


def _to_model(v, newly: bool = False) -> ModelVersion:
    return ModelVersion(
        name=v.name, version=str(v.version), aliases=list(v.aliases or []), tags=dict(v.tags or {}),
        run_id=v.run_id, newly_registered=newly,
        created_s=int((getattr(v, "creation_timestamp", None) or 0) / 1000) or None,
    )


def find_by_artifact(c, name: str, artifact_sha256: str) -> ModelVersion | None:
    found = _read(c, f"searching {name} versions by artifact_sha256",
                  lambda: c.search_model_versions(f"name='{name}' and tags.artifact_sha256='{artifact_sha256}'"),
                  [])
    found = [v for v in found if Tag.ARTIFACTS_LOST not in v.tags]  # a version whose artifacts are gone
    return _to_model(min(found, key=lambda v: int(v.version))) if found else None


def artifacts_lost(c, version: ModelVersion) -> str | None:
    """Why the version's deployable cannot be read back from its MLflow run (the store that held the run's
    artifacts was lost or emptied), or None when it can."""
    try:
        deployable_of(c, version)
    except IntegrityError:
        raise  # modified, not lost: that is refused, never papered over
    except NpuflowError as err:
        return str(err)
    return None


def register(
    c,
    run_id: str,
    model: ModelArtifact,
    quantized: QuantizedArtifact,
    deployable: Deployable,
    validation: ValidationReport,
    benchmark: BenchmarkReport | None = None,
) -> ModelVersion:
    """A model version for this deployable, unless the same artifact is registered already.

    Tags follow DESIGN.md; the `candidate` alias moves to it only when its gates passed. The version's
    description (what a reviewer reads before approving) summarises the gates, the benchmark against the
    current champion and where the run's report is.
    """
    name, sha = deployable.name, deployable.manifest_sha256
    existing = find_by_artifact(c, name, sha)
    if existing is not None and (lost := artifacts_lost(c, existing)) is not None:
        # the registry outlived its artifacts: that version can never load again; the artifact is registered
        # anew (this run's artifacts) and the promotion hands a lost champion's aliases to the new version
        log.warning("%s version %s (artifact %s…) has lost its run's artifacts: %s; registering it anew",
                    name, existing.version, sha[:12], lost)
        tag_version(c, existing, {Tag.ARTIFACTS_LOST: f"{datetime.now(UTC).isoformat(timespec='seconds')}: "
                                                       f"{lost}"[:4900]})
        existing = None
    if existing is not None:
        log.info("artifact %s… is already registered as %s version %s", sha[:12], name, existing.version)
        if validation.passed and by_alias(c, name, Alias.CANDIDATE) is None:
            # a release killed between creating the version and moving `candidate` to it: finish that write
            # (a candidate set since, by a later release, is never moved back)
            c.set_registered_model_alias(name, Alias.CANDIDATE, existing.version)
            existing = _to_model(c.get_model_version(name, existing.version))
        return existing
    if _read(c, f"reading registered model {name}", lambda: c.get_registered_model(name), None) is None:
        c.create_registered_model(name, description=f"npuflow model line {name}")
    gates = "passed" if validation.passed else "failed"
    tags = {
        "source_uri": model.source_uri,
        # the hub's commit; a directory or bucket has none, so the content address of what was fetched
        # (the source manifest: every file's sha256) stands in, prefixed so it is never read as a commit
        "source_revision": model.source_revision or f"manifest-sha256:{model.manifest_sha256}",
        "source_manifest_sha256": model.manifest_sha256,
        "quant_scheme": quantized.scheme,
        "format": quantized.format,
        "device": deployable.device,
        "artifact_sha256": sha,
        "artifact_uri": deployable.uri,
        "gates": gates,
        "rollout": "registered",
    }
    champion = by_alias(c, name, Alias.CHAMPION)  # before this version exists: the one a reviewer compares with
    run = c.get_run(run_id)
    url = run_url(c.tracking_uri, run.info.experiment_id, run_id)
    description = version_description(
        validation, benchmark.metrics if benchmark else None, champion,
        run_metrics(c, champion) if champion else None, run_id,
        report_link(c.tracking_uri, run_id, run.info.artifact_uri) if benchmark else None, url,
    )
    v = c.create_model_version(name, source=version_source(c, quantized, run_id), run_id=run_id, tags=tags,
                               description=description, run_link=url)
    if validation.passed:
        c.set_registered_model_alias(name, Alias.CANDIDATE, v.version)
    log.info("registered %s version %s (gates %s)", name, v.version, gates)
    return _to_model(c.get_model_version(name, v.version), newly=True)


def version_source(c, quantized: QuantizedArtifact, run_id: str) -> str:
    """What `models:/NAME/N` downloads: the quantized artifact in the store (weights, config, tokenizer, its
    manifest and an MLmodel), so MLflow's own tools fetch and load the version, with nothing copied.

    A tracking server refuses a local path outside the run's artifacts as a source, and a local store is
    unreachable from a reviewer's machine anyway: with a file:// store behind a server the source is the
    run's deployable/ (its manifest and where the weights are), and the release says so."""
    if quantized.uri.startswith("file:") and c.tracking_uri.startswith(("http://", "https://")):
        log.warning("the store is a local directory and MLflow is a server: models:/%s gives the deployable "
                    "manifest only (the weights stay at %s); use an S3 store for versions a reviewer on "
                    "another machine can download", quantized.name, quantized.uri)
        return f"runs:/{run_id}/deployable"
    return quantized.uri


def report_link(tracking_uri: str, run_id: str, artifact_uri: str) -> str:
    """A link to the run's report.html a reviewer can open: the server's artifact endpoint when MLflow is a
    server, the artifact store's own URI otherwise (a local path for a local MLflow)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/get-artifact?path=reports/report.html&run_uuid={run_id}"
    return f"{artifact_uri}/reports/report.html"


# ---- the version's description: what the reviewer approves -------------------------------------------

# (metric, label with unit) of the benchmark table; DESIGN.md names, the primary scenario
DESCRIPTION_METRICS = (
    ("ttft_ms_p50", "TTFT p50 (ms)"),
    ("tpot_ms_p50", "TPOT p50 (ms)"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("peak_memory_mb", "peak memory (MB)"),
    ("model_size_mb", "model size (MB)"),
)
DESCRIPTION_MAX_CHARS = 5000  # MLflow's limit on a model version description


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when tracking is a server (None for a local database)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _num(v: float) -> str:
    return f"{v:.4g}"


def version_description(
    validation: ValidationReport,
    benchmark: dict[str, float] | None,
    champion: ModelVersion | None,
    champion_metrics: dict[str, float] | None,
    run_id: str,
    report_uri: str | None,
    run_link: str | None = None,
) -> str:
    """Markdown for the model version's description: each gate (value vs limit, pass/fail), the benchmark
    with deltas against the champion (or "no champion"), and where the report and the run are. Pure."""
    from npuflow.bench.report import metric_deltas

    verdict = "passed" if validation.passed else "FAILED"
    lines = [f"**Validation gates {verdict}** on {validation.eval_tokens} evaluation tokens.", "",
             "| gate | value | limit | result |", "|---|---|---|---|"]
    for name, g in validation.gates.items():
        lines.append(f"| {name} | {_num(g.value)} | {g.op} {_num(g.threshold)} | "
                     f"{'pass' if g.passed else '**FAIL**'} |")
    lines.append("")
    if benchmark is None:
        lines.append("**Benchmark:** not run (a version whose gates failed is not benchmarked).")
    elif champion is None:
        lines += ["**Benchmark** (no champion: nothing to compare with yet)", "",
                  "| metric | this version |", "|---|---|"]
        lines += [f"| {label} | {_num(benchmark[k])} |" for k, label in DESCRIPTION_METRICS if k in benchmark]
    else:
        theirs = champion_metrics or {}
        deltas = {d.metric: d for d in metric_deltas(benchmark, theirs, [k for k, _ in DESCRIPTION_METRICS])}
        lines += [f"**Benchmark against champion v{champion.version}**", "",
                  f"| metric | this version | champion v{champion.version} | change |", "|---|---|---|---|"]
        for k, label in DESCRIPTION_METRICS:
            if k not in benchmark:
                continue
            d = deltas.get(k)
            if d is None:
                lines.append(f"| {label} | {_num(benchmark[k])} | n/a | not measured on the champion |")
                continue
            pct = "n/a" if d.delta_pct is None else f"{d.delta_pct:+.1f}%"
            lines.append(f"| {label} | {_num(d.candidate)} | {_num(d.champion)} | {pct} ({d.verdict}) |")
    lines += ["", f"- MLflow run: `{run_id}`" + (f" ({run_link})" if run_link else "")]
    if report_uri:
        lines.append(f"- Report: `runs:/{run_id}/reports/report.html` ({report_uri})")
    text = "\n".join(lines)
    return text if len(text) <= DESCRIPTION_MAX_CHARS else text[: DESCRIPTION_MAX_CHARS - 1] + "…"


def by_alias(c, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at; None only when MLflow says the model or alias does not exist."""
    v = _read(c, f"reading alias {name}@{alias}", lambda: c.get_model_version_by_alias(name, alias), None)
    return None if v is None else _to_model(v)


def run_metrics(c, version: ModelVersion) -> dict[str, float]:
    """The metrics of the version's MLflow run; a run that is gone or unreadable is an error, never {}."""
    if not version.run_id:
        return {}
    where = f"run {version.run_id} of {version.name} version {version.version}"
    run = _read(c, f"reading {where}", lambda: c.get_run(version.run_id), None)
    if run is None:
        raise RegistryError(f"{where} no longer exists in MLflow at {getattr(c, 'tracking_uri', '?')}: its "
                            "metrics cannot be compared; restore the run or re-register the version")
    return dict(run.data.metrics)


def aliases(c, name: str) -> dict[str, str]:
    """alias -> version for the registered model (empty only when MLflow says it does not exist)."""
    m = _read(c, f"reading the aliases of {name}", lambda: c.get_registered_model(name), None)
    return {} if m is None else {k: str(v) for k, v in m.aliases.items()}


def set_aliases(c, name: str, wanted: dict[str, str | None]) -> None:
    """Make each alias point at its version (None: remove it). Same call twice, same state."""
    current = aliases(c, name)
    for alias, version in wanted.items():
        if version is None and alias in current:
            c.delete_registered_model_alias(name, alias)
        elif version is not None and current.get(alias) != version:
            c.set_registered_model_alias(name, alias, version)


ALIAS_INTENT = "alias_intent"  # version tag: an alias move begun and not yet verified (JSON)


def move_aliases(c, version: ModelVersion, wanted: dict[str, str | None]) -> None:
    """Move several aliases so that any crash point converges on the next run (repair_alias_moves).

    The intent (wanted and the aliases before) is written on `version` first, then the aliases one by
    one, then they are read back and compared, and only then is the intent removed.
    """
    name = version.name
    before = aliases(c, name)
    intent = {"wanted": wanted, "from": {a: before.get(a) for a in wanted}, "at": int(time.time())}
    c.set_model_version_tag(name, version.version, ALIAS_INTENT, json.dumps(intent, sort_keys=True))
    set_aliases(c, name, wanted)
    _verify_aliases(c, name, wanted)
    c.delete_model_version_tag(name, version.version, ALIAS_INTENT)


def _verify_aliases(c, name: str, wanted: dict[str, str | None]) -> None:
    now = aliases(c, name)
    wrong = {a: now.get(a) for a, v in wanted.items() if now.get(a) != v}
    if wrong:
        raise RegistryError(f"{name}: after moving the aliases to {wanted} MLflow reads {wrong}; another writer "
                            "moved them meanwhile. Nothing more was changed: check the aliases and re-run")


def repair_alias_moves(c, name: str) -> list[str]:
    """Finish every alias move a crash left half-done (the version's alias_intent tag); returns what was done.

    A move is rolled forward when each alias is still where it was or already where it goes (the decision
    was recorded before the move began); aliases moved elsewhere since are never overwritten: that is an
    error for a person to look at.
    """
    done = []
    versions = _read(c, f"listing the versions of {name}", lambda: c.search_model_versions(f"name='{name}'"), [])
    for v in sorted(versions, key=lambda v: int(v.version)):
        raw = (v.tags or {}).get(ALIAS_INTENT)
        if raw is None:
            continue
        try:
            intent = json.loads(raw)
            wanted, frm = intent["wanted"], intent["from"]
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"{name} version {v.version} has an unreadable {ALIAS_INTENT} tag {raw[:200]!r}: "
                                "check the aliases by hand, then delete the tag") from None
        if (v.tags or {}).get(Tag.ROLLOUT) != "promoted":  # rolled back (or rejected) since: the move is void
            c.delete_model_version_tag(name, str(v.version), ALIAS_INTENT)
            done.append(f"dropped the unfinished alias move of version {v.version}: it is "
                        f"{(v.tags or {}).get(Tag.ROLLOUT)} now")
            log.warning("%s: %s", name, done[-1])
            continue
        now = aliases(c, name)
        if any(now.get(a) not in (w, frm.get(a)) for a, w in wanted.items()):
            raise RegistryError(
                f"{name}: version {v.version} records an unfinished alias move to {wanted} (from {frm}), but the "
                f"aliases are now {now}: someone moved them since. Check which is right, set the aliases, then "
                f"delete the tag {ALIAS_INTENT} on version {v.version}")
        if any(now.get(a) != w for a, w in wanted.items()):
            set_aliases(c, name, wanted)
            _verify_aliases(c, name, wanted)
            done.append(f"finished the alias move of version {v.version} to {wanted} (was {now})")
            log.warning("%s: %s", name, done[-1])
        c.delete_model_version_tag(name, str(v.version), ALIAS_INTENT)
    return done


def restore_aliases(c, name: str, before: dict[str, str], ours: str | None) -> dict[str, str | None]:
    """Put back the aliases a failed register -> promote moved, compare-before-write: an alias is restored
    only while it still holds what that transaction could have written (`ours`, the version it registered;
    for `previous`, the champion before). One moved by someone else since (a rollback) is left as it is.
    Returns what was restored."""
    now = aliases(c, name)
    wanted: dict[str, str | None] = {}
    for a in (Alias.CANDIDATE, Alias.CHAMPION, Alias.PREVIOUS):
        if now.get(a) == before.get(a):
            continue
        written_by_us = now.get(a) == (before.get(Alias.CHAMPION) if a == Alias.PREVIOUS else ours)
        if written_by_us and ours is not None:
            wanted[a] = before.get(a)
        else:
            log.warning("%s: alias %s is %s now (was %s): moved by someone else, left as it is", name, a,
                        now.get(a), before.get(a))
    set_aliases(c, name, wanted)
    return wanted


def tag_version(c, version: ModelVersion, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        c.set_model_version_tag(version.name, version.version, k, v)


def deployable_of(c, version: ModelVersion) -> tuple[Deployable, dict[str, str]]:
    """The version's Deployable from its MLflow run, checked against the version's artifact_sha256 tag."""
    where = f"{version.name} version {version.version}"
    sha = version.tags.get(Tag.ARTIFACT_SHA256)
    if not version.run_id or not sha:
        raise NpuflowError(f"{where} has no MLflow run or artifact_sha256 tag: not registered by npuflow")
    with tempfile.TemporaryDirectory(prefix="npuflow-registry-") as tmp:
        try:
            local = Path(c.download_artifacts(version.run_id, "deployable", tmp))
            raw = (local / "manifest.json").read_bytes()
            location = json.loads((local / "location.json").read_text())
        except Exception as err:  # MlflowException, OSError, ValueError: one message either way
            raise NpuflowError(f"{where}: cannot read deployable/ from run {version.run_id}: {err}") from None
    if hashlib.sha256(raw).hexdigest() != sha:
        raise IntegrityError(
            f"{where}: deployable/manifest.json of run {version.run_id} does not match the version's "
            f"artifact_sha256 {sha[:12]}…; the registry entry or the run's artifacts were modified"
        )
    return Deployable.model_validate({**json.loads(raw), "uri": location["uri"]}), location
