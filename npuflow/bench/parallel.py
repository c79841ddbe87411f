"""Tensor- / pipeline-parallel benchmark rank (started by torchrun through npuflow.runtime.parallel.launch):
read this rank's part of the weights (runtime/shard_load), measure every scenario through the engine in
lock-step; rank 0 writes the JSON. `launch` starts the ranks (what `npuflow benchmark --mode
tensor-parallel|pipeline-parallel` and the benchmark stage call).

Communication share of TPOT: during the timed runs each rank counts the time inside its collectives and
point-to-point calls (runtime/parallel.COMM, `timed`) for every decode forward (one new token a row); per
scenario, rank 0's comm_ms_per_step = that time / decode steps, comm_share_pct = that time / the decode
steps' wall time (what TPOT is made of).

  torchrun --standalone --nproc-per-node N -m npuflow.bench.parallel MODEL_DIR cpu float32 CONFIG_JSON OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

from npuflow.core.config import BenchmarkConfig
from npuflow.core.errors import ConfigError
from npuflow.runtime.parallel import DIST_BACKENDS


class CommLoop:
    """The engine loop (bench/measure.EngineLoop) that also counts, per timed run, the time inside the
    collectives of each decode forward (forward hooks on the model; prefill forwards are left out)."""

    name = "engine"

    def __init__(self, model, backend, warmup: int):
        from npuflow.bench.measure import EngineLoop
        from npuflow.runtime.parallel import COMM

        self.inner, self.warmup, self.comm = EngineLoop(model, backend), warmup, COMM
        self.first_run_s = self.inner.first_run_s
        self.runs: dict[tuple[int, int, int], int] = {}  # (batch, input_len, output_len) -> calls so far
        self.totals: dict[tuple[int, int, int], list[float]] = {}  # -> [comm s, decode s, decode steps]
        self._decode: list[float] = []  # comm seconds of each decode forward of the current call
        self._at = 0.0
        if backend.NAME != "cpu":
            COMM.sync = backend.synchronize  # asynchronous collectives: time the call itself
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        self._at = self.comm.seconds

    def _after(self, module, args, output) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2 and args[0].shape[1] == 1:
            self._decode.append(self.comm.seconds - self._at)

    def __call__(self, prompt: torch.Tensor, output_len: int):
        key = (prompt.shape[0], prompt.shape[1], output_len)
        n = self.runs[key] = self.runs.get(key, -1) + 1
        self._decode, self.comm.on = [], True
        try:
            ttft, steps, e2e, tokens = self.inner(prompt, output_len)
        finally:
            self.comm.on = False
        decode_steps = output_len - 1  # the scheduler's decode steps of this run are the last forwards
        if n >= self.warmup and decode_steps > 0 and steps:
            t = self.totals.setdefault(key, [0.0, 0.0, 0])
            t[0] += sum(self._decode[-decode_steps:])
            t[1] += sum(steps) / 1e3 / prompt.shape[0]  # every row's interval of one step is that step's time
            t[2] += decode_steps
        return ttft, steps, e2e, tokens

    def annotate(self, scenario: dict) -> dict:
        """The scenario's result with comm_ms_per_step and comm_share_pct (None when nothing was timed)."""
        t = self.totals.get((scenario["batch_size"], scenario["input_len"], scenario["output_len"]))
        if not t or not t[2] or t[1] <= 0:
            return scenario
        return {**scenario, "comm_ms_per_step": 1e3 * t[0] / t[2], "comm_share_pct": 100.0 * t[0] / t[1]}


def _worker(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, out: Path) -> None:
    """One rank (started by torchrun): read its part of the weights (rank-local), measure in lock-step;
    rank 0 writes the JSON with every rank's weight bytes and peak RSS."""
    from npuflow.bench.measure import measure_loaded, model_bytes
    from npuflow.runtime.backends import get_backend
    from npuflow.runtime.loader import DTYPES
    from npuflow.runtime.pipeline import init_ranks, load_rank, peak_rss_mb
    from npuflow.runtime.shard_load import loaded_bytes

    backend = get_backend(device)
    _set_device(backend, int(os.environ["LOCAL_RANK"]))
    layout, group = init_ranks(device, cfg.tp, cfg.pp)
    try:
        model = load_rank(model_dir, backend, DTYPES[dtype], layout, group)
        flag = torch.zeros(1, dtype=torch.int32, device=backend.device())

        def agree(go: bool) -> bool:
            """Rank 0 decides whether to run another iteration; every rank follows."""
            flag.fill_(int(go))
            dist.broadcast(flag, src=0)
            return bool(flag.item())

        world = cfg.tp * cfg.pp
        loop = CommLoop(model, backend, cfg.warmup)
        result = measure_loaded(model, backend, cfg, agree=agree, mode=cfg.mode, devices=world, loop=loop)
        result["scenarios"] = [loop.annotate(s) for s in result["scenarios"]]
        mine = {"rank": layout.rank, "stage": layout.stage, "tp_rank": layout.tp_rank,
                "rank_weight_bytes": model_bytes(model), "peak_rss_mb": peak_rss_mb(),
                "peak_memory_mb": backend.peak_memory_mb()}
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        result |= {"weight_bytes": loaded_bytes(model_dir, DTYPES[dtype]), "rank_weight_bytes": mine[
            "rank_weight_bytes"], "ranks": ranks, "dist_backend": DIST_BACKENDS[device], "tp": cfg.tp, "pp": cfg.pp}
        if layout.rank == 0:
            out.write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()  # without it the ranks abort at exit


def launch(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, ranks: int | None = None,
           timeout_s: float | None = None) -> dict:
    """Run the benchmark on cfg.tp x cfg.pp ranks (torchrun, one device each); rank 0's result.

    Each rank reads only its part of the weights (runtime/shard_load). `ranks`, when given, must be tp x pp."""
    from npuflow.runtime.pipeline import check_model_layout, run_ranks

    world = cfg.tp * cfg.pp
    if ranks is not None and ranks != world:
        raise ConfigError(f"{ranks} ranks asked for tp = {cfg.tp} x pp = {cfg.pp}; tp * pp = {world}")
    check_model_layout(model_dir, cfg.tp, cfg.pp)
    what = f"the {cfg.mode} benchmark (tp = {cfg.tp} x pp = {cfg.pp} ranks, {DIST_BACKENDS[device]})"
    return run_ranks("npuflow.bench.parallel", [str(model_dir), device, dtype, cfg.model_dump_json()], world,
                     device, what, timeout_s)


def _set_device(backend: ModuleType, local_rank: int) -> None:
    if backend.NAME == "cuda":
        torch.cuda.set_device(local_rank)
    elif backend.NAME == "npu":
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]


def _main() -> None:
    p = argparse.ArgumentParser(description="npuflow tensor-parallel benchmark rank (start it with torchrun)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("device", choices=sorted(DIST_BACKENDS))
    p.add_argument("dtype")
    p.add_argument("config_json")
    p.add_argument("output", type=Path, help="where rank 0 writes its JSON result")
    a = p.parse_args()
    _worker(a.model_dir, a.device, a.dtype, BenchmarkConfig.model_validate_json(a.config_json), a.output)
    # Leave without interpreter finalization: even after destroy_process_group, gloo's C++ threads are
    # sometimes torn down during it and abort the rank ("terminate called without an active exception",
    # 2 of 30 runs here). Everything this rank had to say is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main()
