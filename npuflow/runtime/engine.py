"""Generation engine: a static KV cache and an optionally compiled decode step (the fast decode path).

HF's default DynamicCache grows by concatenation every step (a copy of every layer's K and V per
token); a StaticCache is allocated once for `max_len` tokens and written in place, which also gives
torch.compile fixed shapes to specialise the one-token decode step on.
"""

from __future__ import annotations

import torch
from torch import nn


class Engine:
    """Greedy decoding of a causal LM: prefill once, then one token per `decode` call."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False):
        self.model, self.max_len, self.compiled = model, max_len, compile
        self.cache = None
        self.batch = 0
        self.pos = 0  # tokens in the cache
        self._step = torch.compile(self._decode, dynamic=False) if compile else self._decode

    def _decode(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (B, 1), position (1,) -> next token (B, 1)."""
        out = self.model(token, cache=self.cache, cache_position=position, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt (B, T) -> first generated token (B, 1); resets the cache."""
        from transformers import StaticCache

        b, t = prompt.shape
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the engine's {self.max_len}-token cache")
        if self.cache is None or b != self.batch:
            self.cache, self.batch = StaticCache(config=self.model.config, max_cache_len=self.max_len), b
        else:
            self.cache.reset()
        position = torch.arange(t, device=prompt.device)
        logits = self.model(prompt, cache=self.cache, cache_position=position, use_cache=True).logits
        self.pos = t
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at the next position -> the token after it (B, 1)."""
        if self.pos >= self.max_len:
            raise ValueError(f"the engine's cache holds {self.max_len} tokens; generation went past it")
        nxt = self._step(token, torch.tensor([self.pos], device=token.device))
        self.pos += 1
        return nxt.clone()  # compiled graphs may reuse their output buffer

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation (B, new_tokens)."""
        tokens = [self.prefill(prompt)]
        for _ in range(new_tokens - 1):
            tokens.append(self.decode(tokens[-1]))
        return torch.cat(tokens, dim=1)
