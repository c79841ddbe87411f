"""Continuous batching for the server: one engine thread per loaded version drives its Scheduler, and
each request is a `Run` whose tokens reach the event loop through an asyncio queue.

Requests join the running batch at the next step and leave it when they finish; a request whose client
went away (or that passed the time limit) is cancelled and its slot is free at the next step. The
engine thread records when it last made progress, so /health can report an engine that stopped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from npuflow.runtime.engine import Engine, SamplingParams
from npuflow.runtime.scheduler import Scheduler, Sequence

log = logging.getLogger("npuflow.serve")


class Run:
    """One request on the engine: events ("token", id) ... then ("finish", reason) or ("error", message)."""

    def __init__(self, batcher: Batcher, prompt_ids: list[int], params: SamplingParams):
        self.batcher, self.prompt_ids, self.params = batcher, prompt_ids, params
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.seq: Sequence | None = None  # set on the engine thread when admitted to the scheduler
        self.cancelled = False

    def _put(self, kind: str, value: Any) -> None:
        """Hand an event to the request's event loop (from the engine thread). A loop that is gone means
        nobody waits for this request any more: it is cancelled instead."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed
            self.cancelled = True
            if self.seq is not None:
                self.seq.cancelled = True

    def cancel(self) -> None:
        """Stop generating: the slot is free at the engine's next step."""
        self.cancelled = True
        if self.seq is not None:
            self.seq.cancelled = True
        self.batcher.wake()

    async def next(self) -> tuple[str, Any]:
        return await self.queue.get()


class Batcher:
    """The engine thread of one loaded version: admits submitted runs and steps the scheduler."""

    def __init__(self, engine: Engine, label: str, slowdown_s: float = 0.0, max_request_s: float = 600.0):
        self.engine, self.label = engine, label
        self.scheduler = Scheduler(engine)
        self.slowdown_s = slowdown_s  # seconds slept per step: a measurably slow version for rehearsals
        self.max_request_s = max_request_s  # a generation running longer is stopped ("timeout")
        self._inbox: queue.SimpleQueue[Run] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self.last_progress = time.monotonic()  # last step finished (or idle wait began)
        self.peak_running = 0  # most sequences decoded together so far
        self._thread = threading.Thread(target=self._loop, name=f"npuflow-engine-v{label}", daemon=True)
        self._thread.start()

    def submit(self, run: Run) -> None:
        self._inbox.put(run)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Stop the thread once the requests it holds are done (the version left the pool)."""
        self._stop = True
        self._wake.set()

    def busy(self) -> bool:
        return self.scheduler.has_work or not self._inbox.empty()

    def stalled_s(self) -> float:
        """Seconds since the engine last made progress while it has work (0 when idle or progressing)."""
        return time.monotonic() - self.last_progress if self.busy() else 0.0

    def _admit(self) -> None:
        while not self._inbox.empty():
            run = self._inbox.get()
            if run.cancelled:
                run._put("finish", "cancelled")
                continue

            def token(seq: Sequence, tok: int, run: Run = run) -> None:
                run._put("token", tok)

            def finish(seq: Sequence, run: Run = run) -> None:
                reason = seq.finish_reason or "stop"
                run._put("error", reason[len("error: "):]) if reason.startswith("error: ") else \
                    run._put("finish", reason)

            try:
                run.seq = self.scheduler.submit(run.prompt_ids, run.params, on_token=token, on_finish=finish)
            except ValueError as err:
                run._put("error", str(err))

    def _expire(self) -> None:
        now = time.perf_counter()
        for seq in self.scheduler.running.values():
            if now - seq.submitted_at > self.max_request_s:
                seq.cancelled = True  # retired at the step below
                log.warning("version %s: a generation ran past %.0f s and was stopped", self.label,
                            self.max_request_s)

    def _loop(self) -> None:
        while not (self._stop and not self.busy()):  # a closed batcher finishes what it has first
            self._admit()
            if not self.scheduler.has_work:
                self.last_progress = time.monotonic()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._expire()
            try:
                self.scheduler.step()
            except Exception as err:  # the model failed: every request on it gets the error, the thread goes on
                log.exception("engine step failed on version %s", self.label)
                self.scheduler.fail_all(f"{type(err).__name__}: {err}")
            self.peak_running = max(self.peak_running, len(self.scheduler.running))
            self.last_progress = time.monotonic()
            if self.slowdown_s:
                time.sleep(self.slowdown_s)
