"""Fault injection against real services (issue 13): the release as users run it (`npuflow run`, its own
temporary Prefect API, MLflow, a store) killed or cut off part way, then run again.

- SIGKILL of the whole process group (the release and its Prefect server) after each stage has published
  and inside register, then a rerun: one artifact per stage, one version, consistent aliases.
- The MLflow server killed while the release benchmarks: the release fails with one message naming the
  server, nothing is registered or promoted; with the server back, the rerun registers and promotes.
- The S3 endpoint down while the quantized weights upload: retried, and no manifest is ever visible
  before every file it lists is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import yaml

from npuflow.core.artifacts import (
    Deployable,
    FileEntry,
    QuantizedArtifact,
    load_manifest,
    materialize,
    verify_files,
)
from npuflow.core.names import Alias
from npuflow.core.store import open_store
from npuflow.registry import client as registry
from tests.conftest import free_port, start_mlflow_server
from tests.integration.test_cli import REPO

pytestmark = pytest.mark.integration

NAME = "tiny-llama"
STAGES = ("source", "quantized", "deployable", "validation", "benchmark")  # store folders, in run order


def write_config(tmp_path: Path, source: Path) -> Path:
    """The demo config with a shorter evaluation and benchmark (as tests/integration/test_release.py)."""
    cfg = {"name": NAME, "source": {"uri": source.as_uri()},
           "validation": {"max_tokens": 2048, "seq_len": 128},
           "benchmark": {"input_len": 32, "output_len": 8, "warmup": 1, "iterations": 3}}
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NPUFLOW_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(REPO), "NPUFLOW_HOME": str(home), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR":
            "false", **extra}


def run_release(config: Path, env: dict, cwd: Path, kill_when=None, timeout_s: float = 600):
    """`npuflow run CONFIG` in its own process group; SIGKILL of the whole group as soon as kill_when()
    holds. Returns (returncode, stderr) (-9: killed)."""
    err = cwd / f"stderr-{time.monotonic_ns()}.log"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "npuflow.cli", "run", str(config)], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return -9, err.read_text()
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"npuflow run did not finish in {timeout_s} s: {err.read_text()[-3000:]}")
            time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything the release left behind in its group
    except ProcessLookupError:
        pass
    return proc.returncode, err.read_text()


def published(store_root: Path, stage: str) -> list[Path]:
    return sorted((store_root / "models" / NAME / stage).glob("*/manifest.json"))


def assert_every_manifest_whole(store_root: Path) -> None:
    """A manifest present means every file it lists is there with its recorded hash."""
    for manifest in (store_root / "models").rglob("manifest.json"):
        files = json.loads(manifest.read_text()).get("files") or {}
        verify_files(manifest.parent, {k: FileEntry(**v) for k, v in files.items()})


def versions_in(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from model_versions").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked by the writer this instant
        return 0


def test_sigkill_after_every_stage_and_inside_register_then_reruns_converge(tmp_path: Path, tiny_source) -> None:
    """Each run is killed right after the next stage publishes (quantize: while it writes, mid-stage) (the whole process group, Prefect's server
    included), the next run resumes from what was published; the last one is killed once register has
    created the version and before promote; a final run completes. Then: one artifact per stage, one
    version, champion == candidate == that version, its artifact_sha256 the deployable's; no staging dir
    of the killed runs is left in TMPDIR."""
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    store_root = home / "artifacts"
    tmpdir.mkdir()
    config, env = write_config(tmp_path, tiny_source), cli_env(home, TMPDIR=str(tmpdir))
    kills = []
    staged = []  # staging dirs left by the run killed mid-quantize (while it was writing the weights)
    for stage in STAGES:
        when = (lambda: bool(list(tmpdir.glob("npuflow-quantize-*")))) if stage == "quantized" else \
            (lambda s=stage: bool(published(store_root, s)))
        rc, err = run_release(config, env, tmp_path, kill_when=when)
        assert rc == -9, f"the run was not killed after {stage}: rc {rc}\n{err[-3000:]}"
        kills.append({s: len(published(store_root, s)) for s in STAGES})
        staged += [p.name for p in tmpdir.glob("npuflow-*")] if stage == "quantized" else []
        assert_every_manifest_whole(store_root)
    assert staged, "the run killed mid-quantize left no staging dir: the sweep below proves nothing"
    rc, err = run_release(config, env, tmp_path, kill_when=lambda: versions_in(home / "mlflow.db") > 0)
    assert rc == -9, f"the run was not killed inside register/promote: rc {rc}\n{err[-3000:]}"
    rc, err = run_release(config, env, tmp_path)
    assert rc == 0, err[-4000:]
    assert not list(tmpdir.glob("npuflow-*")), f"staging dirs of killed runs left: {list(tmpdir.iterdir())}"

    assert all(len(published(store_root, s)) == 1 for s in STAGES), {s: published(store_root, s) for s in STAGES}
    assert_every_manifest_whole(store_root)
    c = registry.client(f"sqlite:///{home / 'mlflow.db'}")
    versions = c.search_model_versions(f"name='{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert registry.aliases(c, NAME) == {Alias.CHAMPION: "1", Alias.CANDIDATE: "1"}
    assert registry.ALIAS_INTENT not in versions[0].tags
    store = open_store(store_root.as_uri())
    key = published(store_root, "deployable")[0].parent.relative_to(store_root).as_posix()
    deployable = load_manifest(store, key, Deployable)
    assert versions[0].tags["artifact_sha256"] == deployable.manifest_sha256
    print("kills (published artifacts per stage at each kill):", kills, "; left mid-quantize and swept:", staged)


def test_mlflow_server_killed_mid_release_fails_it_and_promotes_nothing(tmp_path: Path, tiny_source) -> None:
    """MLflow is killed while the release benchmarks (before register): the release must fail, name the
    server, and leave the registry as it was; once the server is back the rerun registers and promotes."""
    d, port = tmp_path / "mlflow", free_port()
    d.mkdir()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(d, port)
    home = tmp_path / "home"
    env = cli_env(home, MLFLOW_TRACKING_URI=url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                  MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    config = write_config(tmp_path, tiny_source)

    def kill_server() -> bool:
        if published(home / "artifacts", "validation"):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            return True
        return False

    killer_done = threading.Event()

    def watch() -> None:
        while not killer_done.is_set() and not kill_server():
            time.sleep(0.02)
        killer_done.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        rc, err = run_release(config, env, tmp_path)
    finally:
        killer_done.set()
    assert server.poll() is not None, "the server was never killed: the release did not reach validate"
    assert rc not in (0, -9), err[-3000:]
    assert url in err and "Traceback" not in err, err[-3000:]  # one message naming the server, no traceback
    server = start_mlflow_server(d, port)  # the same registry, back
    try:
        c = registry.client(url)
        assert c.search_model_versions(f"name='{NAME}'") == []
        assert registry.by_alias(c, NAME, Alias.CHAMPION) is None
        rc, err = run_release(config, env, tmp_path)
        assert rc == 0, err[-4000:]
        assert registry.aliases(c, NAME) == {Alias.CHAMPION: "1", Alias.CANDIDATE: "1"}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


class OutageProxy:
    """Forwards 127.0.0.1:port to the S3 endpoint. The first request whose request line matches `trigger`
    starts an outage: that connection and every other open one are dropped (the upload dies part way, the
    client's pooled connections with it) and every connection for outage_s seconds after is closed at once
    (the endpoint is down).
    `on_trigger` runs at that moment."""

    def __init__(self, upstream: str, trigger, outage_s: float, on_trigger=None):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.trigger, self.outage_s, self.on_trigger = (host, int(port)), trigger, outage_s, on_trigger
        self.down_until, self.triggered, self.refused, self.requests = 0.0, None, 0, []
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                with self.lock:
                    self.refused += 1
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.create_connection(self.upstream, timeout=30)
        with self.lock:
            self.live.add(client)

        def back() -> None:
            try:
                while data := up.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0].decode("latin-1")
                if line[:4] in ("GET ", "PUT ", "POST", "HEAD", "DELE"):
                    with self.lock:
                        self.requests.append(line)
                        fire = self.triggered is None and self.trigger(line)
                        if fire:
                            self.triggered = line
                            self.down_until = time.monotonic() + self.outage_s
                    if fire:
                        if self.on_trigger:
                            self.on_trigger()
                        self._drop_all()
                        break
                up.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.live.discard(client)
            client.close()
            up.close()

    def _drop_all(self) -> None:
        with self.lock:
            live = list(self.live)
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_s3_endpoint_down_mid_upload_is_retried_and_no_half_artifact_is_visible(
    prefect_harness, npuflow_home, tiny_source, s3_env, monkeypatch
) -> None:
    from npuflow.flows.release import release

    from tests.integration.test_release import make_config

    s3 = boto3.client("s3")  # straight to the endpoint, past the proxy
    s3.create_bucket(Bucket="faults")

    def quantized_manifests() -> list[str]:
        objs = s3.list_objects_v2(Bucket="faults", Prefix=f"p/models/{NAME}/quantized/").get("Contents", [])
        return [o["Key"] for o in objs if o["Key"].endswith("/manifest.json")]

    seen_at_outage = {}
    proxy = OutageProxy(
        s3_env, trigger=lambda line: line.startswith("PUT ") and "/quantized/" in line and "safetensors" in line,
        outage_s=4.0, on_trigger=lambda: seen_at_outage.setdefault("manifests", quantized_manifests()),
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("NPUFLOW_STORE_URI", "s3://faults/p")
    try:
        result = release(make_config(tiny_source.as_uri()))
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    assert proxy.triggered is not None, "the upload was never cut: nothing to test"
    assert seen_at_outage["manifests"] == []  # the weights were not all there, so no manifest either
    assert proxy.refused > 0, "no request met the outage"
    puts = [r for r in proxy.requests if r.split("?")[0] == proxy.triggered.split("?")[0]]
    assert len(puts) >= 2, puts  # the cut upload, then the retry that landed
    assert result.decision == "promote"
    assert len(quantized_manifests()) == 1
    store = open_store("s3://faults/p")
    key = quantized_manifests()[0].removeprefix("p/").removesuffix("/manifest.json")
    found = load_manifest(store, key, QuantizedArtifact)
    materialize(store, key, found.files, npuflow_home / "check")  # downloads and verifies every hash


def test_ten_concurrent_npuflow_runs_of_two_artifacts_give_one_version_each_and_one_champion(
        tmp_path: Path, tiny_source) -> None:
    """Ten `npuflow run`s started together against one registry and store (each with its own temporary
    Prefect API, so only the store's lock coordinates them): five of a W8A16 config, five of W4A16. Then
    exactly one version per artifact, one champion, every promotion decided against the champion of its
    moment (one run saw none; never two), and a former champion is `previous`, not re-tagged rejected."""
    home = tmp_path / "home"
    configs = []
    for scheme in ("w8a16", "w4a16"):
        cfg = yaml.safe_load(write_config(tmp_path, tiny_source).read_text())
        cfg["quantization"] = {"scheme": scheme}
        configs.append(tmp_path / f"{scheme}.yaml")
        configs[-1].write_text(yaml.safe_dump(cfg))
    env = cli_env(home)
    procs = []
    for i in range(10):
        err = open(tmp_path / f"run-{i}.log", "wb")
        procs.append((subprocess.Popen([sys.executable, "-m", "npuflow.cli", "run", str(configs[i % 2])],
                                       cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True), err))
    codes = []
    for proc, err in procs:
        codes.append(proc.wait(900))
        err.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    logs = [(tmp_path / f"run-{i}.log").read_text() for i in range(10)]
    assert codes == [0] * 10, "\n---\n".join(log[-1500:] for c, log in zip(codes, logs, strict=True) if c)
    c = registry.client(f"sqlite:///{home / 'mlflow.db'}")
    versions = sorted(c.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    shas = [v.tags["artifact_sha256"] for v in versions]
    assert len(versions) == 2 and len(set(shas)) == 2, shas
    assert {v.tags["quant_scheme"] for v in versions} == {"w8a16", "w4a16"}
    # every run decided against the champion of its moment: one saw none, the others name it
    decisions = [m.group(1) for log in logs
                 for m in re.finditer(r"promote: ((?:promote|keep_champion|already_champion|rollout): .*)", log)]
    assert len(decisions) == 10 and sum("no champion yet" in d for d in decisions) == 1, decisions
    assert all("no champion yet" in d or "champion v" in d or d.startswith("already_champion") for d in decisions)
    first_scheme = next(("w8a16", "w4a16")[i % 2] for i, log in enumerate(logs) if "no champion yet" in log)
    first = next(str(v.version) for v in versions if v.tags["quant_scheme"] == first_scheme)
    aliases = registry.aliases(c, NAME)
    assert aliases[Alias.CHAMPION] in ("1", "2") and all(v.tags.get("rollout") == "promoted" for v in versions
                                                          if str(v.version) == aliases[Alias.CHAMPION])
    if aliases[Alias.CHAMPION] != first:  # the second artifact took over from the first
        assert aliases.get(Alias.PREVIOUS) == first
    assert not any(v.tags.get("rollout") == "rejected" and str(v.version) == aliases.get(Alias.PREVIOUS)
                   for v in versions), "a former champion was re-tagged rejected"
    print("10 concurrent runs:", {v.version: (v.tags["quant_scheme"], v.tags.get("rollout")) for v in versions},
          "aliases", aliases)
