"""Generation for one request in a worker thread, its tokens handed to the event loop as text deltas."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from npuflow.runtime.engine import SamplingParams
from npuflow.serving.loaded import LoadedModel
from npuflow.serving.metrics import ServeMetrics

log = logging.getLogger("npuflow.serve")


@torch.inference_mode()
def generate(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> Iterator[tuple[str, str | None]]:
    """Yield (text delta, None) per generated token, then ("", finish_reason): "stop" at EOS, else "length".

    Tokens come from the version's engine (the runtime's one generation loop, as benchmarked). The
    caller holds lm.lock. Text is decoded incrementally; a token that ends inside a multi-byte character
    is held back until the character is complete.
    """
    out_ids, sent = [], ""
    for tok in lm.engine.stream(prompt_ids, params):
        out_ids.append(tok)
        with lm.tok_lock:
            text = lm.tokenizer.decode(out_ids, skip_special_tokens=True)
        delta = "" if text.endswith("\ufffd") or not text.startswith(sent) else text[len(sent):]
        sent += delta
        yield delta, None
    yield "", "length" if len(out_ids) == params.max_tokens else "stop"


class _Run:
    """One generation in a worker thread, its events handed to the event loop through a queue.

    Events: ("token", delta), ("finish", reason), ("error", message). `cancel` stops it at the next token.
    """

    def __init__(self, lm: LoadedModel, prompt_ids: list[int], s: SamplingParams, metrics: ServeMetrics,
                 model_name: str, t0: float, slowdown_s: float = 0.0):
        self.lm, self.prompt_ids, self.s, self.metrics = lm, prompt_ids, s, metrics
        self.slowdown_s = slowdown_s  # ServeOptions.challenger_slowdown_ms on the challenger, else 0
        self.name, self.t0 = model_name, t0  # t0: request arrival, perf_counter seconds
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()
        self.completion_tokens = 0
        threading.Thread(target=self._work, name=f"npuflow-gen-v{lm.label}", daemon=True).start()

    def _put(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def _work(self) -> None:
        labels = (self.name, self.lm.label)
        try:
            with self.lm.lock:
                last = None
                for delta, finish in generate(self.lm, self.prompt_ids, self.s):
                    if self.slowdown_s:
                        time.sleep(self.slowdown_s)
                    now = time.perf_counter()
                    if last is None:
                        self.metrics.ttft.labels(*labels).observe(now - self.t0)
                    elif finish is None:
                        self.metrics.tpot.labels(*labels).observe(now - last)
                    last = now
                    if finish is not None:
                        self._put("finish", finish)
                        return
                    self.completion_tokens += 1
                    self.metrics.tokens.labels(*labels).inc()
                    self._put("token", delta)
                    if self.cancel.is_set():
                        self._put("finish", "cancelled")
                        return
        except Exception as err:  # a model that fails to answer: reported to the request, never raised
            log.exception("generation failed on version %s", self.lm.label)
            self._put("error", f"{type(err).__name__}: {err}")

    async def next(self) -> tuple[str, Any]:
        return await self.queue.get()
