"""TODO."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from npuflow.serving.loading import LoadedModel
from npuflow.serving.metrics import _Metrics

log = logging.getLogger("npuflow.serve")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # tokens to generate at most
    temperature: float  # 0: greedy
    top_p: float  # nucleus: smallest set of tokens whose probability reaches top_p
    seed: int | None  # sampling RNG seed; None: a fresh one


def _next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token id from the last position's logits (V,)."""
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)  # (V,)
    if s.top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < s.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate(lm: LoadedModel, prompt_ids: list[int], s: Sampling) -> Iterator[tuple[str, str | None]]:
    """Yield (text delta, None) per generated token, then ("", finish_reason): "stop" at EOS, else "length".

    The caller holds lm.lock. Text is decoded incrementally; a token that ends inside a multi-byte
    character is held back until the character is complete.
    """
    gen = torch.Generator().manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
    x = torch.tensor([prompt_ids], device=lm.device)  # (1, T_in)
    cache, out_ids, sent = None, [], ""
    for _ in range(s.max_tokens):
        out = lm.model(x, cache=cache, use_cache=True)  # logits (1, T, V)
        cache = out.cache
        tok = _next_token(out.logits[0, -1], s, gen)
        if tok in lm.eos:
            yield "", "stop"
            return
        out_ids.append(tok)
        with lm.tok_lock:
            text = lm.tokenizer.decode(out_ids, skip_special_tokens=True)
        delta = "" if text.endswith("\ufffd") or not text.startswith(sent) else text[len(sent):]
        sent += delta
        yield delta, None
        x = torch.tensor([[tok]], device=lm.device)  # (1, 1)
    yield "", "length"


class _Run:
    """One generation in a worker thread, its events handed to the event loop through a queue.

    Events: ("token", delta), ("finish", reason), ("error", message). `cancel` stops it at the next token.
    """

    def __init__(self, lm: LoadedModel, prompt_ids: list[int], s: Sampling, metrics: _Metrics,
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
