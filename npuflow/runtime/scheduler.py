"""Iteration-level scheduling over the engine's slots (continuous batching, as nano-vllm's scheduler).

One `step()`: retire cancelled sequences, admit waiting ones into free slots, run one prefill forward
(prompt chunks of one or more sequences, at most `prefill_chunk` tokens together, so a long prompt never
stalls the running decodes for long and prompts that arrive together are prefilled together),
then one decode step for every running sequence together, sample each with its own parameters, and
retire those that hit a stop token or max_tokens. Sequences join and leave the batch at any step.

The scheduler is not thread-safe; `npuflow serve` drives it from one engine thread (serving/batcher).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from npuflow.runtime.engine import Engine, SamplingParams, rows_bucket, sample

PREFILL_CHUNK = 512  # prompt tokens per step at most (a longer prompt is prefilled over several steps)


@dataclass(eq=False)
class Sequence:
    """One request in the engine: its prompt, parameters, progress and the tokens generated so far."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[Sequence, int], None] | None = None  # called on the engine thread per token
    on_finish: Callable[[Sequence], None] | None = None  # called once, with finish_reason set
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error: ..."
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter at each generated token
    gen: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def position(self) -> int:
        """The cache position of the next token fed to the model (the last generated one)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


class Scheduler:
    """Waiting and running sequences over an Engine's slots; `step` advances every running sequence."""

    def __init__(self, engine: Engine, prefill_chunk: int = PREFILL_CHUNK):
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._ids = itertools.count()
        self.steps = 0

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_token=None, on_finish=None) -> Sequence:
        """Queue a sequence; ValueError (before any work) when it cannot fit the engine's cache."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.engine.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's {self.engine.max_len}-token cache")
        seq = Sequence(next(self._ids), list(prompt_ids), params, on_token, on_finish, gen=params.generator())
        self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        """Retire cancelled, admit, one prefill forward, one decode step for all running, retire finished."""
        self.steps += 1
        for seq in [s for s in self.running.values() if s.cancelled]:
            self._finish(seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        self._admit()
        decoding = [s for s in self.running.values() if s.prefilled == len(s.prompt_ids) and s.output_ids]
        prefilling = [s for s in sorted(self.running.values(), key=lambda s: s.id) if s.prefilled < len(s.prompt_ids)]
        if prefilling:
            self._prefill(prefilling)
        if decoding:
            self._decode(decoding)

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def _admit(self) -> None:
        free = [s for s in range(self.engine.slots) if s not in self.running]
        while self.waiting and free:
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)  # lowest first: keeps the decoded slot range short
            self.running[seq.slot] = seq

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prompt chunks of the oldest sequences still prefilling, in one forward of at most
        `prefill_chunk` tokens (padding counted): several short prompts share a step, a long one is
        split over steps. A sequence whose prompt is complete samples its first token."""
        chunks: list[tuple[Sequence, list[int]]] = []
        width = 0
        for seq in seqs:
            room = self.prefill_chunk // (len(chunks) + 1)  # the longest chunk n + 1 rows of it allow
            take = seq.prompt_ids[seq.prefilled : seq.prefilled + (self.prefill_chunk if not chunks else room)]
            if chunks and max(width, len(take)) * (len(chunks) + 1) > self.prefill_chunk:
                break
            if chunks and len(take) < len(seq.prompt_ids) - seq.prefilled:
                break  # its prompt would not finish: it waits and is prefilled first next step
            chunks.append((seq, take))
            width = max(width, len(take))
        logits = self.engine.prefill_many([(s.slot, ids, s.prefilled) for s, ids in chunks])  # (n, V)
        for row, (seq, ids) in enumerate(chunks):
            seq.prefilled += len(ids)
            if seq.prefilled == len(seq.prompt_ids):
                self._emit(seq, int(sample(logits[row : row + 1], seq.params, seq.gen)[0]))

    def _decode(self, seqs: list[Sequence]) -> None:
        """One token for each sequence, all slots 0..rows-1 in one step (idle slots compute and are ignored)."""
        rows = rows_bucket(max(s.slot for s in seqs) + 1, self.engine.slots)
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, 1, dtype=torch.long)
        for s in seqs:
            tokens[s.slot, 0], positions[s.slot, 0] = s.last_token, s.position
        live = {s.slot for s in seqs}
        for r in range(rows):  # a row not decoded writes where its slot's next real write goes anyway
            if r not in live and (other := self.running.get(r)) is not None:
                positions[r, 0] = other.position + 1 if other.output_ids else other.prefilled
        dev = self.engine.device
        logits = self.engine.step(0, tokens.to(dev), positions.to(dev))  # (rows, V)
        greedy = [s for s in seqs if s.params.temperature == 0]
        if greedy:
            picks = logits[[s.slot for s in greedy]].argmax(-1).tolist()
            for s, tok in zip(greedy, picks, strict=True):
                self._emit(s, tok)
        for s in seqs:
            if s.params.temperature > 0:
                self._emit(s, int(sample(logits[s.slot : s.slot + 1], s.params, s.gen)[0]))

    def _emit(self, seq: Sequence, tok: int) -> None:
        if tok in seq.params.stop_token_ids:
            self._finish(seq, "stop")
            return
        now = time.perf_counter()
        seq.output_ids.append(tok)
        seq.token_times.append(now)
        if seq.first_token_at is None:
            seq.first_token_at = now
        if seq.on_token is not None:
            seq.on_token(seq, tok)
        if len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        if seq.slot is not None:
            self.running.pop(seq.slot, None)
        if seq.on_finish is not None:
            seq.on_finish(seq)

    def fail_all(self, reason: str) -> None:
        """The engine raised: every sequence ends with the error (the caller reports it)."""
        for seq in [*self.running.values(), *self.waiting]:
            self._finish(seq, f"error: {reason}")
        self.waiting.clear()


def generate(engine: Engine, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of fixed length (no stop token) of every row of prompt (B, T): (B, new_tokens)."""
    sched = Scheduler(engine)
    seqs = [sched.submit(row.tolist(), SamplingParams(max_tokens=new_tokens)) for row in prompt]
    sched.run_until_done()
    return torch.tensor([s.output_ids for s in seqs], device=prompt.device)


def stream(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """One sequence alone on the engine: yield each generated token id (a stop token ends it, unyielded)."""
    sched = Scheduler(engine)
    seq = sched.submit(prompt_ids, params)
    sent = 0
    while not seq.done:
        sched.step()
        while sent < len(seq.output_ids):
            yield seq.output_ids[sent]
            sent += 1
    while sent < len(seq.output_ids):
        yield seq.output_ids[sent]
        sent += 1
