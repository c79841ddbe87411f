"""Pipeline- and tensor-parallel ranks: the process layout, the pipeline stage module and its rank worker.

World of tp x pp ranks; rank = stage * tp + tp_rank. Stage s owns decoder layers [s*L/pp, (s+1)*L/pp)
(contiguous); the first stage also holds the embedding, the last the final norm and lm_head. Inside a
stage the tp ranks split every decoder linear (runtime/parallel.py, all_reduce in the stage's group).
A forward passes the hidden state (B, T, d) from rank (s, t) to rank (s+1, t) with point-to-point
send/recv, and the last stage's logits are broadcast to every rank, so each rank's Engine samples the
same tokens: the one generation loop (runtime/engine.Engine) runs unchanged on every rank.

Worker (started by torchrun through `launch_task`):
  torchrun --standalone --nproc-per-node TP*PP -m npuflow.runtime.pipeline TASK MODEL_DIR cpu float32 TP PP ARGS_FILE OUT
TASK: `generate` (greedy tokens of given prompts), `validate` (quality metrics against a reference that
is sharded the same way, so a 70B fp16 reference fits the cards the candidate needs) or `smoke` (the
convert stage's forward pass).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.runtime.parallel import DIST_BACKENDS, timed
from npuflow.runtime.shard_load import Placement, load_rank_local, stage_layers

TIMEOUT_S = 120.0  # a collective or a rendezvous waiting longer than this fails (a peer died or hangs)


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the tp x pp grid."""

    rank: int
    tp: int
    pp: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def peer(self, stage: int) -> int:
        """The rank with this rank's tp index in `stage`."""
        return stage * self.tp + self.tp_rank

    @property
    def logits_src(self) -> int:
        """The rank whose logits every rank takes (the last stage's tp rank 0)."""
        return (self.pp - 1) * self.tp


def check_layout(config: dict, tp: int, pp: int, group_size: int | None = None) -> None:
    """Fail before any rank starts when tp does not split heads, kv heads, the MLP or int4 groups, or pp
    the layers: one ConfigError naming the number and the fix."""
    heads = config["num_attention_heads"]
    kv, ffn = config.get("num_key_value_heads") or heads, config["intermediate_size"]
    if tp < 1 or pp < 1:
        raise ConfigError(f"tp and pp must be >= 1, got tp = {tp}, pp = {pp}")
    for what, n, by, knob in (("num_attention_heads", heads, tp, "tp"), ("num_key_value_heads", kv, tp, "tp"),
                              ("intermediate_size", ffn, tp, "tp"),
                              ("num_hidden_layers", config["num_hidden_layers"], pp, "pp")):
        if n % by:
            raise ConfigError(f"{what} = {n} does not split over {knob} = {by}; choose a {knob} that divides {n}")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    for name, n in (("o_proj", heads * head_dim), ("down_proj", ffn)):
        if group_size and (n // tp) % group_size:
            raise ConfigError(f"{name}'s {n} input features over tp = {tp} ({n // tp} each) do not split into "
                              f"whole int4 groups of {group_size}; use a tp or group_size that does")


class PipelineStage(nn.Module):
    """One rank's stage of the model with the model's call signature (what Engine and compare call).

    forward(input_ids (B, T), ...) -> .logits (B, K, V) on every rank, K = the positions kept."""

    def __init__(self, model: nn.Module, layout: Layout):
        super().__init__()
        self.inner, self.layout, self.config = model, layout, model.config
        self.first, self.last = layout.stage == 0, layout.stage == layout.pp - 1
        self.hidden = model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        b, t = input_ids.shape
        dtype = self.inner.dtype
        if self.first:
            h = self.inner.model.embed_tokens(input_ids)  # (B, T, d)
        else:
            h = torch.empty(b, t, self.hidden, dtype=dtype, device=input_ids.device)
            timed(dist.recv, h, src=self.layout.peer(self.layout.stage - 1))
        if self.last:
            logits = self.inner(inputs_embeds=h, logits_to_keep=logits_to_keep, **kwargs).logits
        else:
            out = self.inner.model(inputs_embeds=h, **kwargs).last_hidden_state  # norm is Identity here
            timed(dist.send, out.contiguous(), dst=self.layout.peer(self.layout.stage + 1))
            k = len(logits_to_keep) if isinstance(logits_to_keep, torch.Tensor) else (logits_to_keep or t)
            logits = torch.empty(b, min(k, t), self.config.vocab_size, dtype=dtype, device=input_ids.device)
        if self.layout.pp > 1:
            logits = logits.contiguous()
            timed(dist.broadcast, logits, src=self.layout.logits_src)
        return SimpleNamespace(logits=logits)


def init_ranks(device: str, tp: int, pp: int, timeout_s: float = TIMEOUT_S) -> tuple[Layout, object]:
    """Join the process group (torchrun's env), build every stage's tp group; this rank's layout and tp group."""
    world = int(os.environ["WORLD_SIZE"])
    if world != tp * pp:
        raise ConfigError(f"{world} ranks started for tp = {tp} x pp = {pp}; start tp * pp = {tp * pp}")
    try:
        dist.init_process_group(DIST_BACKENDS[device], timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistError as e:  # DistStoreError: "Timed out after N seconds waiting for clients. 1/2 ..."
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise NpuflowError(
            f"rendezvous at {where} failed within {timeout_s:g} s ({e}); start all {world} ranks (torchrun "
            "--nnodes/--nproc-per-node on every host) with the same --rdzv-endpoint, reachable from each"
        ) from None
    layout = Layout(int(os.environ["RANK"]), tp, pp)
    group = None
    if tp > 1 and pp > 1:
        for s in range(pp):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(s * tp, (s + 1) * tp)))
            group = g if s == layout.stage else group
    return layout, group


def load_rank(model_dir: Path, backend: ModuleType, dtype: torch.dtype, layout: Layout, group) -> nn.Module:
    """This rank's part of the model (rank-local reads), wrapped as a pipeline stage when pp > 1."""
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    place = Placement(tp_rank=layout.tp_rank, tp=layout.tp,
                      layers=stage_layers(n_layers, layout.stage, layout.pp) if layout.pp > 1 else None,
                      first=layout.stage == 0, last=layout.stage == layout.pp - 1)
    model = load_rank_local(model_dir, backend, dtype, place, group)
    return PipelineStage(model, layout) if layout.pp > 1 else model


# ---------------------------------------------------------------------------------------------- worker


def _generate(model: nn.Module, backend: ModuleType, args: dict) -> dict:
    """Greedy tokens of every prompt through the one generation loop (the same on every rank)."""
    from npuflow.runtime.engine import Engine
    from npuflow.runtime.scheduler import generate

    prompt = torch.tensor(args["prompts"], device=backend.device())  # (B, T)
    engine = Engine(model, max_len=prompt.shape[1] + args["max_new_tokens"], slots=prompt.shape[0])
    return {"greedy_tokens": generate(engine, prompt, args["max_new_tokens"]).tolist()}


def _validate(model: nn.Module, backend: ModuleType, args: dict, dtype: torch.dtype, layout: Layout,
              group) -> dict:
    """Quality metrics of the candidate against the reference, both sharded the same way."""
    from npuflow.eval.quality import compare
    from npuflow.runtime.loader import DTYPES

    ref_dtype = DTYPES[args.get("reference_dtype", str(dtype).removeprefix("torch."))]
    reference = load_rank(Path(args["reference"]), backend, ref_dtype, layout, group)
    windows = torch.tensor(args["windows"])  # (N, seq_len)
    return compare(reference, model, windows, args["batch_size"], backend.device())


def _smoke(model: nn.Module, backend: ModuleType, args: dict) -> dict:
    """One forward pass on the given tokens (the convert stage's smoke test): are the logits finite, and the
    first 8 logits of the last position (the stage fingerprints them)."""
    ids = torch.tensor([args["tokens"]], device=backend.device())  # (1, T)
    logits = model(ids).logits.float()  # (1, T, vocab)
    return {"finite": bool(torch.isfinite(logits).all()), "last_logits": logits[0, -1, :8].cpu().tolist()}


TASKS = ("generate", "validate", "smoke")


def _set_device(backend: ModuleType, local_rank: int) -> None:
    if backend.NAME == "cuda":
        torch.cuda.set_device(local_rank)
    elif backend.NAME == "npu":
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]


def worker(task: str, model_dir: Path, device: str, dtype_name: str, tp: int, pp: int, args: dict,
           out: Path) -> None:
    """One rank: join, load its part, run `task` in lock-step with the others; rank 0 writes the JSON."""
    from npuflow.runtime.backends import get_backend
    from npuflow.runtime.loader import DTYPES

    backend = get_backend(device)
    _set_device(backend, int(os.environ.get("LOCAL_RANK", "0")))
    layout, group = init_ranks(device, tp, pp, float(args.get("timeout_s", TIMEOUT_S)))
    try:
        with torch.inference_mode():
            model = load_rank(model_dir, backend, DTYPES[dtype_name], layout, group)
            loaded_rss = peak_rss_mb()
            if task == "generate":
                result = _generate(model, backend, args)
            elif task == "validate":
                result = _validate(model, backend, args, DTYPES[dtype_name], layout, group)
            elif task == "smoke":
                result = _smoke(model, backend, args)
            else:
                raise ConfigError(f"invalid task {task!r}; valid: {', '.join(TASKS)}")
        result |= {"peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": loaded_rss, "rank": layout.rank}
        gathered = [None] * (tp * pp)
        dist.all_gather_object(gathered, result)
        if layout.rank == 0:
            out.write_text(json.dumps({**result, "ranks": gathered}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def peak_rss_mb() -> float:
    """This process's peak resident set, MiB (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _main() -> None:
    p = argparse.ArgumentParser(description="npuflow tp x pp rank (start it with torchrun)")
    p.add_argument("task", choices=TASKS)
    p.add_argument("model_dir", type=Path)
    p.add_argument("device", choices=sorted(DIST_BACKENDS))
    p.add_argument("dtype")
    p.add_argument("tp", type=int)
    p.add_argument("pp", type=int)
    p.add_argument("args_file", type=Path, help="the task's arguments, JSON")
    p.add_argument("output", type=Path, help="where rank 0 writes its JSON result")
    a = p.parse_args()
    worker(a.task, a.model_dir, a.device, a.dtype, a.tp, a.pp, json.loads(a.args_file.read_text()), a.output)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads sometimes abort interpreter finalization (see npuflow/bench/parallel.py)


# ---------------------------------------------------------------------------------------------- launcher


def rank_failure(stderr: str) -> str:
    """What went wrong in a torchrun run, in one line: a rank killed by a signal (torchrun's root cause),
    else the first exception a rank printed, else the root cause's exit code."""
    cause = stderr[stderr.find("Root Cause"):] if "Root Cause" in stderr else ""
    died = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", cause, re.S)
    if died and int(died.group(2)) < 0:
        return f"rank {died.group(1)} died (killed by signal {-int(died.group(2))}); the other ranks were stopped"
    for found in re.finditer(r"^(?:\[rank\d+\]:\s*)?([\w.]*(?:Error|Exception)\b:.*)$", stderr, re.M):
        if "ChildFailedError" not in found.group(1):
            return found.group(1)
    if died:
        return f"rank {died.group(1)} exited with {died.group(2)}"
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else "no output"


def check_model_layout(model_dir: Path, tp: int, pp: int) -> None:
    """check_layout on a model directory (its config and, when quantized, its int4 group size)."""
    qm = model_dir / "quant_manifest.json"
    check_layout(json.loads((model_dir / "config.json").read_text()), tp, pp,
                 json.loads(qm.read_text()).get("group_size") if qm.is_file() else None)


def rank_env(world: int, device: str) -> dict[str, str]:
    """This process's environment for `world` local ranks: npuflow importable however this process found it,
    and, on the CPU, the cores shared out (OMP_NUM_THREADS = cores / ranks unless set)."""
    import npuflow

    env = dict(os.environ)
    root = str(Path(npuflow.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if device == "cpu":  # the ranks share the cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return env


def run_ranks(module: str, argv: list[str], world: int, device: str, what: str, timeout_s: float,
              payload: str | None = None) -> dict:
    """torchrun `python -m MODULE *argv [ARGS_FILE] OUT` on `world` local ranks (one device each) and return
    the JSON rank 0 writes to OUT; `payload` goes through ARGS_FILE (argv is limited to 128 KiB). One
    NpuflowError naming `what` when a rank dies or time runs out."""
    env = rank_env(world, device)
    with tempfile.TemporaryDirectory(prefix="npuflow-ranks-") as tmp:
        out, args_file = Path(tmp) / "rank0.json", Path(tmp) / "args.json"
        if payload is not None:
            args_file.write_text(payload)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", module, *argv, *([str(args_file)] if payload is not None else []), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise NpuflowError(f"{what} ran past {timeout_s} s") from None
        if proc.returncode != 0 or not out.is_file():
            raise NpuflowError(f"{what} failed (exit {proc.returncode}): {rank_failure(proc.stderr)}\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def launch_task(task: str, model_dir: Path, device: str, dtype: str, tp: int, pp: int, args: dict,
                timeout_s: float = 600.0) -> dict:
    """Run `task` on tp * pp ranks (torchrun, one device each) and return rank 0's result; one NpuflowError
    when the layout does not fit the model (before any rank starts), a rank dies or time runs out."""
    check_model_layout(model_dir, tp, pp)
    return run_ranks("npuflow.runtime.pipeline", [task, str(model_dir), device, dtype, str(tp), str(pp)], tp * pp,
                     device, f"{task} on tp = {tp} x pp = {pp} ranks ({DIST_BACKENDS[device]})", timeout_s,
                     payload=json.dumps(args))


if __name__ == "__main__":
    _main()
