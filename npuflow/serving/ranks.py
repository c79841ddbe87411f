"""npuflow's engine on tp x pp ranks behind the router: one torchrun rank of a served version.

The router starts this as a child process group (`remote.RanksProcess`, the same lifetime as a vLLM engine's:
the guard, the watcher, a restarted champion) and streams each request to rank 0 as token ids, as it does to
vLLM. Every rank reads only its part of the weights (runtime/pipeline.load_rank) and builds the same Engine;
rank 0 serves the npuflow OpenAI API on 127.0.0.1 (the pool, continuous batching, sampling, stop strings:
the code `npuflow serve` runs in process) over a `runtime.lockstep.LeaderEngine`, and the other ranks run
`lockstep.follow`, the same engine calls in the same order. The KV cache slots are the fewest any rank's
budget allows (each holds its own heads' or layers' share of every slot).

  python -m npuflow.serving.ranks --ranks TP*PP MODEL_DIR --device cpu --dtype auto --tp 2 --pp 1 \
      --port 8100 --served-name NAME [--graph|--eager] [--max-batch 16] [--kv-cache-gib G]

`--ranks N` starts the N ranks on this host as torchrun --standalone would (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
but in its own process group, which the router's guard kills as a whole (torchrun puts each worker in a
session of its own: a SIGKILLed torchrun would leave them running). One rank exiting stops the others.

On two hosts, start it with `torchrun --nnodes 2 --node-rank R --master-addr HOST0 --master-port 29500` on each
(a static rendezvous: rank 0 is on HOST0) and run the router on HOST0 with `serving.url: http://127.0.0.1:PORT`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from npuflow.core.artifacts import Deployable
from npuflow.core.config import ServingConfig
from npuflow.core.names import Alias
from npuflow.registry import client as registry
from npuflow.runtime.backends import get_backend
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import DTYPES, load_tokenizer
from npuflow.runtime.lockstep import LeaderEngine, command_group, follow
from npuflow.runtime.parallel import DIST_BACKENDS
from npuflow.runtime.pipeline import TIMEOUT_S, Layout, init_ranks, load_rank
from npuflow.serving.generation import on_own_thread
from npuflow.serving.loading import directory_version, kv_budget_bytes, kv_slots, serve_engine
from npuflow.serving.options import ServeOptions
from npuflow.serving.pool import ModelPool

log = logging.getLogger("npuflow.serve")


def rank_slots(hf: dict, layout: Layout, dtype: torch.dtype, context: int, max_batch: int,
               kv_cache_gib: float | None, device: torch.device, group) -> int:
    """KV cache slots every rank can hold: each holds its kv heads' (1/tp) share of its stage's (1/pp) layers
    of every slot; the budget is --kv-cache-gib over all ranks, or this rank's share of the free memory (on the
    CPU the ranks share the host: 1/(tp*pp) of it each). The minimum over the ranks (all_reduce on `group`)."""
    world = layout.tp * layout.pp
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    mine = SimpleNamespace(num_attention_heads=heads // layout.tp, num_key_value_heads=kv // layout.tp,
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, hidden_size=hf["hidden_size"],
                           num_hidden_layers=hf["num_hidden_layers"] // layout.pp)
    if kv_cache_gib:
        budget = int(kv_cache_gib * 2**30 / world)
    else:
        budget = kv_budget_bytes(device) // (world if device.type == "cpu" else 1)
    slots = torch.tensor([kv_slots(mine, dtype, context, max_batch, budget, f"rank {layout.rank}")])
    dist.all_reduce(slots, op=dist.ReduceOp.MIN, group=group)
    return int(slots.item())


def _leader_pool(engine: LeaderEngine, model_dir: Path, args: argparse.Namespace,
                 version: registry.ModelVersion, deployable: Deployable) -> ModelPool:
    """Rank 0's pool: the one version, on the lock-step engine, checked to answer (the followers run the probe
    with it), served under --served-name."""
    opts = ServeOptions(name=args.served_name, tracking_uri="", store_uri="", max_batch=args.max_batch,
                        cache_dir=Path(tempfile.gettempdir()) / "npuflow-ranks", max_tokens_limit=args.max_tokens,
                        max_request_s=args.max_request_s, max_body_bytes=1 << 20, serving=ServingConfig())
    lm = on_own_thread(serve_engine, engine, load_tokenizer(model_dir), version, deployable, opts)
    return ModelPool(opts, resolve=lambda alias: version if alias == Alias.CHAMPION else None,
                     load=lambda _v: lm, where=f"{model_dir} (tp {args.tp} x pp {args.pp})")


def serve_rank(args: argparse.Namespace) -> None:
    """One rank: join, read its part of the weights, build the engine; rank 0 serves until it is stopped, the
    others follow it."""
    from npuflow.serving.app import run_server

    backend = get_backend(args.device)
    if backend.NAME in ("cuda", "npu"):
        getattr(torch, backend.NAME).set_device(int(os.environ.get("LOCAL_RANK", "0")))
    layout, group = init_ranks(args.device, args.tp, args.pp, args.collective_timeout_s)
    calls = command_group(args.collective_timeout_s)
    # the version and dtype `npuflow serve --model` would serve (auto: the engine's dtype for the device)
    version, deployable = directory_version(args.model_dir, args.served_name, args.device, args.dtype, args.graph,
                                            "npuflow")
    dtype = DTYPES[deployable.dtype]
    hf = json.loads((args.model_dir / "config.json").read_text())
    context = min(int(hf.get("max_position_embeddings", 2048)), args.max_len or 1 << 30)
    load = on_own_thread if layout.rank == 0 else _call  # rank 0's engine thread stays its only OpenMP user
    model = load(load_rank, args.model_dir, backend, dtype, layout, group)
    slots = rank_slots(hf, layout, dtype, context, args.max_batch, args.kv_cache_gib, backend.device(), calls)
    log.info("rank %d of %d: %d slots of %d tokens", layout.rank, args.tp * args.pp, slots, context)
    if layout.rank != 0:
        engine = Engine(model, max_len=context, slots=slots, compile=args.graph)
        with torch.inference_mode():
            follow(engine, calls)
        return
    leader = LeaderEngine(model, max_len=context, slots=slots, compile=args.graph, group=calls)
    pool = _leader_pool(leader, args.model_dir, args, version, deployable)
    pool.reload()
    try:
        run_server(pool, host=args.host, port=args.port)
    finally:
        with contextlib.suppress(Exception):  # the followers may be gone already (SIGTERM to the group)
            leader.stop_followers()


def _call(fn, *args):
    return fn(*args)


def launch_local(world: int, argv: list[str]) -> int:
    """Start `world` ranks of this module on this host (what torchrun --standalone does) and wait: when one
    exits, the others are stopped (SIGTERM, SIGKILL after STOP_GRACE_S) and its exit code is returned (0 only
    when every rank exited 0). Unlike torchrun's, these ranks stay in this process group, so the router's guard
    and `EngineProcess.stop()` (which kill and wait for the group) reach every one of them."""
    import signal
    import subprocess
    import time

    from npuflow.serving.remote import STOP_GRACE_S, free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-m", "npuflow.serving.ranks", *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    stopping: list[int] = []

    def on_term(signum, _frame):
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, on_term)
    rc = None
    while rc is None:
        for r, proc in enumerate(procs):
            if proc.poll() is not None and (proc.returncode != 0 or all(p.poll() is not None for p in procs)):
                rc = proc.returncode
                if rc != 0 and not stopping:
                    log.error("rank %d exited with %d; stopping the other ranks", r, rc)
                break
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rc


def _main() -> None:
    if sys.argv[1:2] == ["--ranks"]:  # the launcher: start the ranks on this host, exit as they do
        logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(message)s")
        sys.exit(launch_local(int(sys.argv[2]), sys.argv[3:]))
    p = argparse.ArgumentParser(description="npuflow engine rank behind the router (start it with torchrun, or "
                                            "as `python -m npuflow.serving.ranks --ranks N ARGS`)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--device", choices=sorted(DIST_BACKENDS), default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="auto: what the engine table says for the device (bfloat16 on the CPU), as npuflow serve")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="rank 0's interface (loopback: the router is on this host)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-name", required=True)
    p.add_argument("--max-len", type=int, default=0, help="tokens a sequence may reach (0: the model's context)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-request-s", type=float, default=600.0)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--collective-timeout-s", type=float,
                   default=float(os.environ.get("NPUFLOW_COLLECTIVE_TIMEOUT_S", TIMEOUT_S)),
                   help="a rendezvous, or a step's collective waiting on a rank that hangs, fails after this; rank 0 "
                        "then exits and the router restarts the version (env NPUFLOW_COLLECTIVE_TIMEOUT_S)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eager", dest="graph", action="store_false")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '?')} %(message)s")
    try:
        serve_rank(args)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads sometimes abort interpreter finalization (see npuflow/bench/parallel.py)


if __name__ == "__main__":
    _main()
