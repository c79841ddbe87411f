"""The vLLM child process management, with a stand-in HTTP server for vLLM (the real one is in
tests/integration/test_vllm_engine.py): its process group lives and dies with the server, the parent's
SIGKILL included; a failed start names the log; a missing interpreter says `make vllm`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from npuflow.core.config import ServingConfig
from npuflow.core.engines import engine_dtype, engine_problem
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.serving import remote
from npuflow.serving.remote import VllmProcess, group_alive

# A stand-in for the vLLM API server: starts a grandchild (vLLM's EngineCore), answers /health.
FAKE = textwrap.dedent("""
    import http.server, subprocess, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if mode == "crash":
        print("fake engine: cannot load the model", flush=True)
        sys.exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


class FakeVllm(VllmProcess):
    mode = "serve"

    def command(self, python: Path, port: int) -> list[str]:
        return [str(python), "-c", FAKE, str(port), self.mode]


def fake(tmp_path: Path, mode: str = "serve", **cfg) -> FakeVllm:
    p = FakeVllm(ServingConfig(engine="vllm", python=sys.executable, **cfg), tmp_path, "m-v1", "cpu", "bfloat16",
                 256, tmp_path / "engine.log")
    p.mode = mode
    return p


def members(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True, check=True).stdout
    return [int(a) for a, b in (line.split() for line in out.splitlines()) if int(b) == pgid]


def test_the_engine_runs_in_its_own_process_group_and_stop_leaves_none_of_it(tmp_path) -> None:
    p = fake(tmp_path)
    url = p.start()
    pgid = p.proc.pid
    assert url == f"http://127.0.0.1:{p.port}" and p.alive()
    assert os.getpgid(pgid) == pgid != os.getpgid(0)
    deadline = time.monotonic() + 10
    while len(members(pgid)) < 3 and time.monotonic() < deadline:  # guard, server, grandchild
        time.sleep(0.05)
    assert len(members(pgid)) >= 3
    p.stop()
    assert not group_alive(pgid) and not p.alive()
    p.stop()  # idempotent


def test_no_engine_survives_a_sigkilled_server(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_engines import fake
        p = fake(Path({str(tmp_path)!r}))
        p.start()
        print(p.proc.pid, flush=True)
        time.sleep(600)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = int(server.stdout.readline())
    assert group_alive(pgid)
    server.send_signal(signal.SIGKILL)
    server.wait()
    deadline = time.monotonic() + remote.STOP_GRACE_S + 10
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(pgid), f"orphans: {members(pgid)}"


def test_an_engine_that_exits_while_starting_is_an_error_with_its_log(tmp_path) -> None:
    p = fake(tmp_path, "crash")
    with pytest.raises(NpuflowError, match="exited \\(3\\) before it was healthy") as info:
        p.start()
    assert "fake engine: cannot load the model" in str(info.value)
    assert p.proc is None


def test_an_engine_that_never_answers_times_out_and_is_stopped(tmp_path) -> None:
    p = fake(tmp_path, "serve", startup_timeout_s=1)
    p.command = lambda python, port: [str(python), "-c", "import time; time.sleep(600)"]  # type: ignore[method-assign]
    with pytest.raises(NpuflowError, match="did not answer /health within 1 s"):
        p.start()


def test_a_missing_vllm_interpreter_says_make_vllm(tmp_path) -> None:
    p = VllmProcess(ServingConfig(engine="vllm", python=str(tmp_path / "nope/python")), tmp_path, "m", "cpu",
                    "bfloat16", 256, tmp_path / "log")
    with pytest.raises(ConfigError, match="run `make vllm`"):
        p.start()


def test_an_engine_that_dies_is_reported_and_a_stopped_one_is_not(tmp_path) -> None:
    p = fake(tmp_path)
    p.start()
    died = threading.Event()
    reasons: list[str] = []
    p.watch(lambda reason: (reasons.append(reason), died.set()))
    os.kill(p.proc.pid, signal.SIGKILL)  # the guard (the group's leader) dies
    assert died.wait(10) and "exited" in reasons[0]
    p.stop()
    q = fake(tmp_path)
    q.start()
    q.watch(lambda reason: reasons.append("should not happen"))
    q.stop()
    time.sleep(0.3)
    assert len(reasons) == 1


def test_the_command_carries_parallelism_and_the_ascend_quantization(tmp_path) -> None:
    cfg = ServingConfig(engine="vllm", tensor_parallel_size=2, pipeline_parallel_size=2, extra_args=("--x",))
    cmd = VllmProcess(cfg, tmp_path, "m-v3", "npu", "bfloat16", 4096, tmp_path / "log").command(Path("py"), 9)
    joined = " ".join(cmd)
    assert "-m vllm.entrypoints.openai.api_server" in joined and "--served-model-name m-v3" in joined
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 2 --quantization ascend --x" in joined
    assert "--quantization" not in VllmProcess(cfg, tmp_path, "m", "cpu", "bfloat16", 1, tmp_path).command(
        Path("py"), 9)


def test_the_engine_table() -> None:
    assert engine_problem("npuflow", "cpu", "w8a16", "native") is None
    assert engine_problem("vllm", "cpu", "w4a16", "compressed-tensors") is None
    assert engine_dtype("vllm", "cpu", "auto") == "bfloat16" and engine_dtype("npuflow", "cpu", "auto") == "auto"
    assert "known: npuflow, vllm" in engine_problem("tgi", "cpu", "w4a16", "native")


# ---- the pool's handling of an engine that dies (stand-in engines, real process groups) -----------------


def remote_pool(tmp_path: Path, engine_restarts: int = 3):
    from npuflow.core.artifacts import Deployable
    from npuflow.registry.client import ModelVersion
    from npuflow.serving.loaded import LoadedModel
    from npuflow.serving.options import ServeOptions
    from npuflow.serving.pool import ModelPool
    from npuflow.serving.remote import RemoteEngine

    aliases = {"champion": "1", "candidate": "2"}

    def resolve(alias: str):
        v = aliases.get(alias)
        return None if v is None else ModelVersion(name="m", version=v, aliases=[alias], run_id=None, tags={})

    def load(version):
        proc = fake(tmp_path / f"v{version.version}")
        d = Deployable(uri="file:///x", key="k", name="m", quantized_manifest_sha256="s", quantized_key="q",
                       device="cpu", device_name="cpu", runtime="npuflow-eager", dtype="bfloat16", kernels={},
                       versions={}, smoke_logits_sha256="", engine="vllm")
        return LoadedModel(version=version, deployable=d, model=None, engine=None, batcher=None, tokenizer=None,
                           device=None, context=256, eos=frozenset(), remote=RemoteEngine(proc.start(), "m", proc))

    opts = ServeOptions(name="m", tracking_uri="sqlite://", store_uri="file:///x", cache_dir=tmp_path,
                        engine_restarts=engine_restarts)
    pool = ModelPool(opts, resolve, load)
    pool.reload()
    return pool


def wait_for(cond, within_s: float = 30) -> bool:
    deadline = time.monotonic() + within_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)
    return cond()


def test_a_dead_challenger_engine_leaves_rotation_and_a_dead_champion_engine_is_restarted(tmp_path) -> None:
    pool = remote_pool(tmp_path)
    try:
        champ, chal = pool.champion.model, pool.challenger.model
        chal_pgid, champ_pgid = chal.remote.process.proc.pid, champ.remote.process.proc.pid
        os.killpg(chal_pgid, signal.SIGKILL)
        assert wait_for(lambda: pool.challenger.model is None)
        assert "exited" in pool.health()["challenger"]["reason"] and pool.effective_weights()["challenger"] == 0
        assert wait_for(lambda: not group_alive(chal_pgid))

        os.killpg(champ_pgid, signal.SIGKILL)
        assert wait_for(lambda: any(e["event"] == "champion engine restarted" for e in pool.events))
        assert pool.champion.model is champ and champ.remote.alive() and champ.remote.restarts == 1
        assert champ.remote.process.proc.pid != champ_pgid and pool.health()["champion"]["engine"]["alive"]
        new_pgid = champ.remote.process.proc.pid
    finally:
        pool.close()
    assert not group_alive(new_pgid)


def test_a_champion_engine_that_will_not_restart_is_reported(tmp_path) -> None:
    pool = remote_pool(tmp_path, engine_restarts=1)
    try:
        champ = pool.champion.model
        champ.remote.process.mode = "crash"  # every start from now on fails
        os.killpg(champ.remote.process.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: champ.remote.state == "dead")
        health = pool.health()
        assert health["status"] == "degraded" and "did not restart" in pool.champion.reason
        assert [e["event"] for e in pool.events][-2:] == ["champion engine died", "champion engine restart failed"]
    finally:
        pool.close()


def test_an_engine_at_a_url_is_connected_to_by_the_model_it_serves() -> None:
    import http.server
    import json

    from npuflow.serving.remote import connect, free_port

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "llama-v7"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert connect(f"http://127.0.0.{{version}}:{port}/", "1") == (f"http://127.0.0.1:{port}", "llama-v7")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(NpuflowError, match="does not answer GET /v1/models"):
        connect(f"http://127.0.0.1:{free_port()}", "1")


def test_a_worker_killed_by_sigill_is_named_with_the_amx_fix(tmp_path) -> None:
    p = VllmProcess(ServingConfig(engine="vllm"), tmp_path, "m", "cpu", "bfloat16", 1, tmp_path / "e.log")
    assert p.failure_hint() == ""  # no log yet
    (tmp_path / "e.log").write_text("ERROR [multiproc_executor.py:315] Worker proc VllmWorker-0 died unexpectedly "
                                    "(exit code: -4), shutting down executor.\n")
    assert "SIGILL" in p.failure_hint() and "infra/vllm/amx_permission.pth" in p.failure_hint()
    (tmp_path / "e.log").write_text("Worker proc VllmWorker-0 died unexpectedly (exit code: -9)\n")
    assert "exit code: -9" in p.failure_hint() and "AMX" not in p.failure_hint()


def test_the_amx_permission_line_grants_the_tile_state_where_the_cpu_has_amx() -> None:
    """What vLLM 0.32's CPU kernels need on an AMX host (else SIGILL at the first forward): the .pth line
    asks for XTILEDATA (bit 18) and the interpreter then holds it (infra/vllm/install.sh puts it in
    every interpreter of .venv-vllm); on CPUs without AMX the line is a no-op."""
    line = (Path(__file__).resolve().parents[2] / "infra/vllm/amx_permission.pth").read_text()
    probe = ("import ctypes; b = ctypes.c_ulong(); ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(b)); "
             "print(b.value >> 18 & 1)")
    out = subprocess.run([sys.executable, "-c", line.strip() + "\n" + probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    has_amx = "amx_tile" in Path("/proc/cpuinfo").read_text() if sys.platform == "linux" else False
    assert out == ("1" if has_amx else "0")
