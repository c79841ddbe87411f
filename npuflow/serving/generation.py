"""Continuous batching for the server: one engine thread steps every loaded version's Scheduler (a
`Batcher` each), and each request is a `Run` whose tokens reach the event loop through an asyncio queue.

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
from collections.abc import Callable
from typing import Any, TypeVar

from npuflow.runtime.engine import Engine, SamplingParams
from npuflow.runtime.scheduler import Scheduler, Sequence

log = logging.getLogger("npuflow.serve")
T = TypeVar("T")


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
    """One loaded version's scheduler, stepped by the process's engine thread: admits submitted runs and
    runs one scheduler step at a time (continuous batching)."""

    def __init__(self, engine: Engine, label: str, slowdown_s: float = 0.0, max_request_s: float = 600.0):
        self.engine, self.label = engine, label
        self.scheduler = Scheduler(engine)
        self.slowdown_s = slowdown_s  # seconds between this version's steps: a measurably slow version for rehearsals
        self.max_request_s = max_request_s  # a generation running longer is stopped ("timeout")
        self._inbox: queue.SimpleQueue[Run] = queue.SimpleQueue()
        self.closed = False
        self.next_step_at = 0.0  # time.monotonic() before which this version is not stepped (slowdown_s)
        self.last_progress = time.monotonic()  # last step finished (or idle wait began)
        self.peak_running = 0  # most sequences decoded together so far
        self._thread = engine_thread()
        self._thread.add(self)

    def submit(self, run: Run) -> None:
        self._inbox.put(run)
        self._thread.wake()

    def wake(self) -> None:
        self._thread.wake()

    def close(self) -> None:
        """Leave the engine thread once the requests it holds are done (the version left the pool)."""
        self.closed = True
        self._thread.wake()

    def alive(self) -> bool:
        return self._thread.alive()

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

    def step(self) -> bool:
        """Admit, then one scheduler step if there is work (on the engine thread). False: nothing to do."""
        self._admit()
        if not self.scheduler.has_work:
            self.last_progress = time.monotonic()
            return False
        self._expire()
        try:
            self.scheduler.step()
        except Exception as err:  # the model failed: every request on it gets the error, the thread goes on
            log.exception("engine step failed on version %s", self.label)
            self.scheduler.fail_all(f"{type(err).__name__}: {err}")
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        self.last_progress = time.monotonic()
        self.next_step_at = self.last_progress + self.slowdown_s
        return True


class EngineThread:
    """The one thread of a process that runs model steps: every loaded version's Batcher, round robin (one
    scheduler step each in turn), and nothing else; it sleeps while none has work.

    One thread for all versions, and no model work on the event loop's (main) thread, because of how
    libgomp (the OpenMP runtime of the CPU wheel) waits: each thread that starts parallel regions gets its
    own pool of OpenMP workers, and once the process holds more OpenMP threads than CPUs every worker
    sleeps on a futex after 100 spins instead of ~300,000, so each parallel region (a compiled decode step
    has hundreds) pays a futex wake. Measured on 2 cores, 220M W4A16, one sequence: a compiled decode
    step of 13.7 ms when one thread does all the model work, 32-40 ms when the loading thread and the
    stepping thread differ (and at least as slow as one OpenMP thread). Models are loaded in a thread of
    their own that ends with the load (`on_own_thread`), which hands its OpenMP workers back."""

    def __init__(self) -> None:
        self._batchers: list[Batcher] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="npuflow-engine", daemon=True)
        self._thread.start()

    def add(self, batcher: Batcher) -> None:
        with self._lock:
            self._batchers.append(batcher)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            self._wake.clear()  # a wake() from here on is seen by the wait below
            with self._lock:  # a closed batcher leaves once the requests it holds are done
                self._batchers = [b for b in self._batchers if not (b.closed and not b.busy())]
                batchers = list(self._batchers)
            now, stepped, soonest = time.monotonic(), False, 1.0
            for b in batchers:
                if b.next_step_at > now:  # a slowed version waits for its turn; the others go on
                    soonest = min(soonest, b.next_step_at - now)
                    continue
                stepped = b.step() or stepped
            if not stepped:
                self._wake.wait(soonest if any(b.busy() for b in batchers) else 1.0)


_engine_thread: EngineThread | None = None
_engine_thread_lock = threading.Lock()


def engine_thread() -> EngineThread:
    """The process's engine thread (started on first use)."""
    global _engine_thread
    with _engine_thread_lock:
        if _engine_thread is None or not _engine_thread.alive():
            _engine_thread = EngineThread()
        return _engine_thread


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread that ends when it returns (its result, or its exception raised here).

    Model loading runs so: loading runs OpenMP regions (dtype conversions, weight repacking, the first
    compiled steps), and a thread that ends hands its OpenMP workers back, so that the engine thread stays
    the process's only OpenMP user (see EngineThread)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # raised again in the caller's thread
            out["error"] = err

    t = threading.Thread(target=run, name="npuflow-load", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
