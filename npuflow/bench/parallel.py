"""Tensor-parallel benchmark rank (started by torchrun through npuflow.runtime.parallel.launch): load,
shard, measure every scenario through the engine in lock-step; rank 0 writes the JSON.

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
from npuflow.runtime.parallel import DIST_BACKENDS, shard_llama


def _worker(model_dir: Path, device: str, dtype: str, cfg: BenchmarkConfig, out: Path) -> None:
    """One rank (started by torchrun): load, shard, measure in lock-step; rank 0 writes the JSON."""
    from npuflow.bench.measure import measure_loaded, model_bytes
    from npuflow.runtime.backends import get_backend
    from npuflow.runtime.loader import DTYPES, load_quantized

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = get_backend(device)
    _set_device(backend, local)
    dist.init_process_group(DIST_BACKENDS[device])
    try:
        model = load_quantized(model_dir, backend, DTYPES[dtype])
        full_bytes = model_bytes(model)
        shard_llama(model, rank, world)
        if device == "cuda":
            torch.cuda.empty_cache()
        flag = torch.zeros(1, dtype=torch.int32, device=backend.device())

        def agree(go: bool) -> bool:
            """Rank 0 decides whether to run another iteration; every rank follows."""
            flag.fill_(int(go))
            dist.broadcast(flag, src=0)
            return bool(flag.item())

        result = measure_loaded(model, backend, cfg, agree=agree, mode="tensor-parallel", devices=world)
        result |= {"weight_bytes": full_bytes, "rank_weight_bytes": model_bytes(model),
                   "dist_backend": DIST_BACKENDS[device]}
        if rank == 0:
            out.write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()  # without it the ranks abort at exit


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
