"""The one generation loop on tp x pp ranks driven by rank 0: what a tensor- or pipeline-parallel server runs.

Every rank holds its part of the model (runtime/pipeline.load_rank) and an Engine over it; each forward is a
collective, so every rank must run the same engine calls in the same order. Rank 0 runs the Scheduler (the
server's continuous batching, sampling, stop conditions) on a `LeaderEngine`, which sends each call it makes
(`step`, `prefill_many`) to the other ranks before running it; the others run `follow`, which receives the
calls and runs them on their own Engine. Only rank 0 samples: the tokens it picked reach the others as the
next call's input. The logits are the same on every rank (the last stage broadcasts them, the vocabulary
split of the lm_head is gathered), so no rank needs another's.

The calls travel on a group of their own (`command_group`, gloo, CPU tensors) whose timeout is long: a
server can stay idle for hours, and the followers wait in that broadcast meanwhile. The model's collectives
keep the short timeout of the default group, so a peer that hangs in the middle of a step fails the step.
A rank that dies closes its connections: the others' next collective raises, the rank exits (`_or_exit`), and
the launcher (or torchrun) stops them all.

Messages: a header int64 (4,) [op, a, b, c], then for
  STEP  (a = start, b = rows, c = tokens per row): tokens and positions as one (2, rows, c) tensor;
  MANY  (a = chunks, b = prompt tokens in all):    (slot, length, start) per chunk then the ids, one flat tensor;
  STOP: nothing (the followers return).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading

import torch
import torch.distributed as dist

from npuflow.runtime.engine import Engine
from npuflow.runtime.pipeline import TIMEOUT_S

log = logging.getLogger("npuflow.lockstep")
STOP, STEP, MANY = 0, 1, 2
EXIT_OUT_OF_STEP = 3  # rank 0's exit code when a call failed part-way (see _or_exit)
IDLE_TIMEOUT = datetime.timedelta(days=365)  # the followers wait for the next call this long at most


def command_group(timeout_s: float = TIMEOUT_S):
    """The group the calls travel on (every rank, gloo: CPU tensors, whatever the model's backend); every rank
    calls this once, in the same order relative to its other new_group calls. The timeout is each rank's own:
    the followers wait for the next call IDLE_TIMEOUT, rank 0's sends fail after timeout_s (a follower that
    hangs, SIGSTOPped or swapped out, must not hold rank 0 forever)."""
    rank0 = dist.get_rank() == 0
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s) if rank0 else IDLE_TIMEOUT)


def _send(group, header: list[int], payload: torch.Tensor | None = None) -> None:
    dist.broadcast(torch.tensor(header, dtype=torch.long), src=0, group=group)
    if payload is not None:
        dist.broadcast(payload.to("cpu", torch.long).contiguous(), src=0, group=group)


class FollowersStopped(RuntimeError):
    """An engine call after stop_followers (the server is shutting down)."""


class LeaderEngine(Engine):
    """Rank 0's Engine: every model call is sent to the followers first, then run here (in lock-step with them).

    A call's send and run hold one lock, so STOP (sent from the server's thread at shutdown) never lands
    between a call's header and its run, and a call can never follow STOP."""

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self._lock = threading.RLock()  # re-entrant: a one-chunk prefill_many runs as a step
        self._stopped = False

    def _sent(self, header: list[int], payload: torch.Tensor) -> None:
        if self._stopped:
            raise FollowersStopped("the engine's follower ranks were stopped: the server is shutting down")
        _send(self.group, header, payload)

    def step(self, start: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        with self._lock:
            return _or_exit(self._sent, [STEP, start, b, t], torch.stack([tokens.cpu(), positions.cpu()]),
                            super().step, start, tokens, positions)

    def prefill_many(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        if len(chunks) == 1:  # Engine runs one chunk as a step (sent as one by step() above)
            return super().prefill_many(chunks)
        meta = [x for slot, ids, start in chunks for x in (slot, len(ids), start)]
        flat = torch.tensor(meta + [t for _, ids, _ in chunks for t in ids], dtype=torch.long)
        with self._lock:
            return _or_exit(self._sent, [MANY, len(chunks), flat.numel() - len(meta), 0], flat,
                            super().prefill_many, chunks)

    def stop_followers(self) -> None:
        """Tell the followers to return from `follow` (the server is shutting down); later calls raise."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                _send(self.group, [STOP, 0, 0, 0])


def _or_exit(send, header: list[int], payload: torch.Tensor, call, *args):
    """send(header, payload) to the followers, then call(*args), on rank 0.

    A ValueError from the call is the engine refusing its inputs before any collective (a position past the
    cache): every rank raised it, they are still in step, and the scheduler reports it to its requests.
    Anything else may have left the ranks at different collectives (a peer died, hung past the timeout, ran
    out of memory): no later call could be trusted, so the rank exits and the launcher stops the others; the
    router's watcher restarts the version on new ranks."""
    try:
        send(header, payload)
        return call(*args)
    except (ValueError, FollowersStopped):
        raise
    except BaseException as err:
        log.critical("engine call failed on rank 0 (%s: %s): the ranks are out of step; exiting so that the group "
                     "is restarted", type(err).__name__, err)
        logging.shutdown()
        os._exit(EXIT_OUT_OF_STEP)


def follow(engine: Engine, group) -> int:
    """Run the calls rank 0's LeaderEngine sends until it sends STOP; the number of calls run.

    A ValueError raised here was raised on rank 0 as well (same inputs, same checks: a position past the
    cache), and rank 0's scheduler reports it to its requests: the follower logs it and waits for the next
    call. Any other error propagates: the rank exits and its launcher stops the group."""
    header = torch.empty(4, dtype=torch.long)
    calls = 0
    while True:
        dist.broadcast(header, src=0, group=group)
        op, a, b, c = header.tolist()
        if op == STOP:
            return calls
        if op == STEP:
            data = torch.empty(2, b, c, dtype=torch.long)
        elif op == MANY:
            data = torch.empty(3 * a + b, dtype=torch.long)
        else:
            raise RuntimeError(f"rank 0 sent an unknown engine call {op}: the ranks run different npuflow code")
        dist.broadcast(data, src=0, group=group)
        calls += 1
        try:
            if op == STEP:
                dev = engine.device
                engine.step(a, data[0].to(dev), data[1].to(dev))
            else:
                meta, ids = data[: 3 * a].view(a, 3).tolist(), data[3 * a :].tolist()
                chunks, at = [], 0
                for slot, n, start in meta:
                    chunks.append((slot, ids[at : at + n], start))
                    at += n
                engine.prefill_many(chunks)
        except ValueError as err:  # refused before any collective, on rank 0 as here (see _or_exit)
            log.warning("engine call %d failed here as on rank 0: %s", calls, err)
