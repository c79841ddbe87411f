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
from npuflow.serving import vllm_engine
from npuflow.serving.vllm_engine import VllmProcess, group_alive

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
    deadline = time.monotonic() + vllm_engine.STOP_GRACE_S + 10
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
