"""The one generation loop: prefill, decode step, sampling and stop conditions.

`npuflow serve`, `npuflow benchmark` (both runtimes), the tensor-parallel benchmark ranks, validation's
smoke checks and the tests generate through `Engine`, so what is benchmarked is what is served.

The KV cache is a static one by default: HF's DynamicCache grows by concatenation every step (a copy of
every layer's K and V per token); a StaticCache is allocated once for `max_len` tokens and written in
place, which also gives torch.compile fixed shapes to specialise the one-token decode step on.
`cache="dynamic"` runs the same loop on HF's DynamicCache: the `hf-eager` baseline, plain transformers
as users know it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

CacheKind = Literal["static", "dynamic"]
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 0..2**63-1 here (larger values raise)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is continued."""

    max_tokens: int  # generated tokens at most (the stop token not counted)
    temperature: float = 0.0  # 0: greedy (argmax); else softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # sampling RNG seed, 0..SEED_MAX; None: a fresh one per sequence
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)  # end the sequence (not emitted)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be 0..{SEED_MAX}, got {self.seed}")

    def generator(self) -> torch.Generator | None:
        """The RNG of one sequence (None when greedy: nothing is drawn)."""
        if self.temperature == 0:
            return None
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) of the last position -> next token ids (B,), greedy or by temperature and top_p."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (B, V)
    if params.top_p < 1:
        p, idx = probs.sort(dim=-1, descending=True)
        keep = p.cumsum(-1) - p < params.top_p  # the most likely token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, idx, p * keep)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


class Engine:
    """Generation on one causal LM with one KV cache of `max_len` tokens for a batch of sequences.

    prefill(prompt) -> logits; decode(token) -> logits; `generate` (fixed length, greedy: the benchmark's
    loop) and `stream` (one sequence with sampling and stop tokens: the server's loop) are built on them.
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False, cache: CacheKind = "static"):
        if cache not in ("static", "dynamic"):
            raise ValueError(f"unknown cache {cache!r}; valid: static, dynamic")
        if compile and cache == "dynamic":
            raise ValueError("a compiled decode step needs the static cache (fixed shapes)")
        self.model, self.max_len, self.compiled, self.cache_kind = model, max_len, compile, cache
        self.cache = None
        self.batch = 0
        self.pos = 0  # tokens in the cache
        self._step = torch.compile(self._forward_one, dynamic=False) if compile else self._forward_one

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward_one(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (B, 1), position (1,) -> logits (B, V) of the next token."""
        out = self.model(token, cache=self.cache, cache_position=position, use_cache=True)
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt (B, T) -> logits (B, V) of the first generated token; resets the cache."""
        b, t = prompt.shape
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the engine's {self.max_len}-token cache")
        if self.cache_kind == "dynamic":
            out = self.model(prompt, use_cache=True)
            self.cache, self.pos = out.cache, t
            return out.logits[:, -1]
        if self.cache is None or b != self.batch:
            from transformers import StaticCache

            self.cache, self.batch = StaticCache(config=self.model.config, max_cache_len=self.max_len), b
        else:
            self.cache.reset()
        position = torch.arange(t, device=prompt.device)
        logits = self.model(prompt, cache=self.cache, cache_position=position, use_cache=True).logits
        self.pos = t
        return logits[:, -1]

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at the next position -> logits (B, V) of the token after it."""
        if self.pos >= self.max_len:
            raise ValueError(f"the engine's cache holds {self.max_len} tokens; generation went past it")
        if self.cache_kind == "dynamic":
            out = self.model(token, cache=self.cache, use_cache=True)
            self.cache = out.cache
            logits = out.logits[:, -1]
        else:
            logits = self._step(token, torch.tensor([self.pos], device=token.device))
        self.pos += 1
        return logits.clone() if self.compiled else logits  # compiled graphs may reuse their output buffer

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of fixed length (no stop token): (B, new_tokens)."""
        tokens = [self.prefill(prompt).argmax(-1, keepdim=True)]  # (B, 1)
        for _ in range(new_tokens - 1):
            tokens.append(self.decode(tokens[-1]).argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """One sequence: yield each generated token id; stops at a stop token (not yielded) or max_tokens.

        The caller may stop iterating at any token (a cancelled request): nothing more is computed.
        """
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's {self.max_len}-token cache")
        gen = params.generator()
        logits = self.prefill(torch.tensor([prompt_ids], device=self.device))  # (1, V)
        for i in range(params.max_tokens):
            tok = int(sample(logits, params, gen)[0])
            if tok in params.stop_token_ids:
                return
            yield tok
            if i + 1 < params.max_tokens:
                logits = self.decode(torch.tensor([[tok]], device=self.device))
