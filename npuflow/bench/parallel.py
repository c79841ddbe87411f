"""Tensor- / pipeline-parallel benchmark rank (started by torchrun through npuflow.runtime.parallel.launch):
read this rank's part of the weights (runtime/shard_load), measure every scenario through the engine in
lock-step; rank 0 writes the JSON. `launch` starts the ranks (what `npuflow benchmark --mode
tensor-parallel|pipeline-parallel` and the benchmark stage call).

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
        result = measure_loaded(model, backend, cfg, agree=agree, mode=cfg.mode, devices=world)
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
