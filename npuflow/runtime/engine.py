"""The one generation loop: a KV cache of slots, the model step over them, sampling and stop conditions.

`Engine` runs the model on a batch of independent sequences, each in its own slot of a static KV cache
(`SlotCache`: slots x max_len tokens per layer, written in place at each sequence's own positions).
`runtime.scheduler.Scheduler` decides what each step runs (admit, prefill chunks, one decode step for
every running sequence, retire); `npuflow serve`, `npuflow benchmark`, the tensor-parallel benchmark
ranks and the tests all generate through it, so what is benchmarked is what is served.

Shapes: a step runs the contiguous slot range [0, rows) with T new tokens each; attention reads the
first `kv_len` positions of those slots, masked per row to the positions each sequence has written.
`rows` and `kv_len` are rounded up to buckets so that graph mode compiles a handful of shapes.
"""

from __future__ import annotations

import secrets
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from npuflow.runtime import cpu_kernels

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 0..2**63-1 here (larger values raise)
KV_BUCKET = 128  # attention length granularity, tokens: a step reads ceil(longest / 128) * 128 positions


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
    """logits (B, V) of the last position -> next token ids (B,), greedy or by temperature and top_p.

    Logits are scaled in float64: a temperature as small as 1e-6 then still gives finite probabilities.
    The draw inverts the cumulative distribution at one uniform number per row (0.1 ms at a vocabulary of
    32000 on the CPU; torch.multinomial took 0.8 ms, a twentieth of a decode step)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / params.temperature, dim=-1).cpu()  # (B, V)
    if params.top_p < 1:
        p, idx = probs.sort(dim=-1, descending=True)
        keep = p.cumsum(-1) - p < params.top_p  # the most likely token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, idx, p * keep)
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]  # uniform in [0, total)
    picks = torch.searchsorted(cdf, u, right=True)  # the first token whose cdf passes u: never one of p = 0
    picks = torch.where(picks < probs.shape[-1], picks, probs.argmax(-1, keepdim=True))  # u rounded up to total
    return picks.squeeze(-1).to(logits.device)


ATTENTION = "npuflow_decode"  # HF attention implementation the engine selects (registered below)


def _single_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scaling: float) -> torch.Tensor:
    """Attention of one query per row: query (B, H, 1, D), key/value (B, kv_heads, L, D) or the engine's
    cache blocks (L / BLOCK, B, kv_heads, BLOCK, D), mask (B, 1, 1, L) bool or additive, or None -> (B, 1, H, D)."""
    b, h, _, d = query.shape
    if key.dim() == 5 and key.is_contiguous() and value.is_contiguous():
        return _single_query_blocks(query, key, value, mask, scaling)
    if key.dim() == 5:  # the engine's cache blocks (nb, B, kvh, BLOCK, D), each dense: bmm reads them in place
        keys, values = [k.flatten(0, 1) for k in key.unbind(0)], [v.flatten(0, 1) for v in value.unbind(0)]
        kvh = key.shape[2]
    else:
        keys, values, kvh = [key.flatten(0, 1)], [value.flatten(0, 1)], key.shape[1]  # (B * kvh, L, D)
    q = query.reshape(b * kvh, h // kvh, d)  # the query heads that share each kv head
    scores = torch.cat([torch.bmm(q, k.transpose(1, 2)) for k in keys], dim=-1).float()  # (B * kvh, g, L)
    length = scores.shape[-1]
    scores = scores.view(b, kvh, -1, length) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b * kvh, -1, length)
    width = keys[0].shape[1]
    out = sum(torch.bmm(probs[..., i * width : (i + 1) * width], v) for i, v in enumerate(values))
    return out.view(b, h, 1, d).transpose(1, 2)  # (B, 1, H, D)


def _single_query_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scaling: float) -> torch.Tensor:
    """`_single_query` on contiguous cache blocks (nb, B, kv_heads, BLOCK, D) (the step runs every slot): every
    block is one batch entry of a single bmm for the scores and one for the values, whatever the length (the
    per-block loop made 2 bmm calls per block: 32 a layer at 2048 positions, each mostly call overhead)."""
    b, h, _, d = query.shape
    nb, _, kvh, width, _ = key.shape
    g = h // kvh
    q = query.reshape(1, b * kvh, g, d).expand(nb, -1, -1, -1).reshape(nb * b * kvh, g, d)
    scores = torch.bmm(q, key.view(nb * b * kvh, width, d).transpose(1, 2)).float()  # (nb * B * kvh, g, BLOCK)
    scores = scores.view(nb, b, kvh, g, width).permute(1, 2, 3, 0, 4).reshape(b, kvh, g, nb * width) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)  # (B, kvh, g, L)
    probs = probs.view(b, kvh, g, nb, width).permute(3, 0, 1, 2, 4).reshape(nb * b * kvh, g, width)
    out = torch.bmm(probs, value.view(nb * b * kvh, width, d)).view(nb, b, h, d).sum(0)  # (B, H, D)
    return out.view(b, 1, h, d)


@torch.library.custom_op("npuflow::single_query_attention", mutates_args=())
def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                           scaling: float) -> torch.Tensor:
    """`_single_query` as one opaque op: inductor calls it as it is. Traced into the graph, its two matmuls
    with one query row are lowered to multiply-and-sum loops that took 42% of a compiled CPU decode step
    (1.5 ms a layer at 256 keys, measured with inductor's kernel profile); the op runs them as BLAS bmm."""
    return _single_query(query, key, value, mask, scaling).contiguous()


@single_query_attention.register_fake
def _(query, key, value, mask, scaling):
    b, h, _, d = query.shape
    return query.new_empty(b, 1, h, d)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF attention interface: one-token steps as two small matmuls and a softmax per kv-head group
    (2.5-5x faster than SDPA on the CPU for a single query, measured at 1-16 rows and 256-1024 keys);
    everything else goes to SDPA. query (B, H, 1, D), key/value (B, kv_heads, L, D), mask (B, 1, 1, L)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        if query.device.type == "cpu" and cpu_kernels.available():  # the C++ kernel: 5-8x the op below
            blocks = (key, value) if key.dim() == 5 else (key.unsqueeze(0), value.unsqueeze(0))
            return torch.ops.npuflow_cpu.decode_attention(query, *blocks, attention_mask, float(scale)), None
        return single_query_attention(query, key, value, attention_mask, float(scale)), None
    return _single_query(query, key, value, attention_mask, scale), None  # (B, 1, H, D), as SDPA returns


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # callers other than the engine get SDPA's masks


def bucket(n: int, size: int) -> int:
    return -(-n // size) * size


def rows_bucket(n: int, slots: int) -> int:
    """The slot range a step runs for `n` rows in use: the next power of two, at most `slots`."""
    return min(slots, 1 << max(0, n - 1).bit_length())


def dense_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The cache blocks a decode step reads, (nb, B, kv_heads, BLOCK, D), as one (B, kv_heads, nb * BLOCK, D)
    tensor (a copy), for attention kernels that take K and V whole (the NPU's fused attention)."""
    nb, b, kvh, block, d = blocks.shape
    return blocks.permute(1, 2, 0, 3, 4).reshape(b, kvh, nb * block, d)


class SlotCache:
    """K and V of every layer for `slots` sequences of up to `max_len` tokens, in blocks of KV_BUCKET
    positions: (max_len / KV_BUCKET, slots, kv_heads, KV_BUCKET, D) per layer.

    Block-major, so that what a decode step reads is dense: block j of slots start..start+B-1 is one
    contiguous (B, kv_heads, KV_BUCKET, D) tensor, which BLAS reads in place (a slot-major cache sliced to
    kv_len is strided, and the bf16 bmm copied it first: 3x the memory traffic at 16 rows).

    The model calls update(k, v, layer) once per layer per step; `begin_step` says which slots the step
    runs (rows 0..B-1 of the step are slots start..start+B-1, or the listed slots), where each new token
    goes and how many positions attention reads. Each layer's is allocated on its first update, from the key
    shape (tensor-parallel ranks hold their own heads, a pipeline stage only its layers)."""

    def __init__(self, layers: int, slots: int, max_len: int):
        self.n_layers, self.slots, self.max_len = layers, slots, max_len
        self.blocks = -(-max_len // KV_BUCKET)
        self.keys: list[torch.Tensor | None] = [None] * layers  # allocated on a layer's first update: a
        self.values: list[torch.Tensor | None] = [None] * layers  # pipeline stage holds only its own layers
        self.start, self.rows, self.kv_len = 0, 0, 0
        self.write_pos: torch.Tensor | None = None  # (B, T) position of each new token
        self.slot_ids: torch.Tensor | None = None  # (B,) the step's slots when they are not a contiguous range

    def begin_step(self, start: int, positions: torch.Tensor, kv_len: int, slots: torch.Tensor | None = None) -> None:
        """Rows 0..B-1 of the next step are slots start..start+B-1, or the slots listed in `slots` (B,)."""
        self.start, self.rows = start, positions.shape[0]
        self.write_pos, self.kv_len, self.slot_ids = positions, kv_len, slots

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v (B, kv_heads, T, D) written at write_pos. Returns, for a one-token step over a slot range,
        the blocks it reads: (kv_len / KV_BUCKET, B, kv_heads, KV_BUCKET, D) views (the engine's attention
        takes them as they are); otherwise (B, kv_heads, kv_len, D) copies for SDPA."""
        K, V = self.keys[layer_idx], self.values[layer_idx]
        if K is None or V is None:
            shape = (self.blocks, self.slots, k.shape[1], KV_BUCKET, k.shape[3])
            K = self.keys[layer_idx] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            V = self.values[layer_idx] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        if self.slot_ids is not None:
            rows = self.slot_ids[:, None]  # (B, 1)
        else:
            rows = torch.arange(self.start, self.start + self.rows, device=k.device)[:, None]
        blk, off = self.write_pos // KV_BUCKET, self.write_pos % KV_BUCKET  # (B, T) each
        # written into the cache tensors themselves (into a view, graph mode would copy it back each
        # step): K[blk, slot_b, :, off] = k[b, :, t] for every row b and new token t
        K[blk, rows, :, off] = k.transpose(1, 2)
        V[blk, rows, :, off] = v.transpose(1, 2)
        nb = -(-self.kv_len // KV_BUCKET)
        if self.slot_ids is None and k.shape[2] == 1:
            end = self.start + self.rows
            return K[:nb, self.start : end], V[:nb, self.start : end]
        sel = self.slot_ids if self.slot_ids is not None else rows[:, 0]
        return dense_blocks(K[:nb, sel]), dense_blocks(V[:nb, sel])


def _own_copy(method):
    """The bound method as a function with its own code object. Dynamo keeps compiled graphs, and their guards,
    per code object: with a copy, each engine's graphs are looked up among its own only, so the guards on the
    model's modules can be dropped (they took 0.8 ms of a ~10 ms decode step of the 220M Llama on 2 CPU
    threads) without one engine ever running a graph traced for another model."""
    f = method.__func__
    func = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(func, method.__self__)


class Engine:
    """The model step over slots of a static KV cache; the Scheduler decides what each step runs.

    step(start, tokens (B, T), positions (B, T)) writes the new tokens' K/V into slots start..start+B-1 at
    `positions` and returns the logits (B, V) of each row's last token. With `compile`, one-token steps
    (decode) run a compiled graph, one per (rows, kv_len) bucket pair.
    """

    def __init__(self, model: nn.Module, max_len: int, slots: int = 1, compile: bool = False):
        self.model, self.max_len, self.slots, self.compiled = model, max_len, slots, compile
        self.cache = SlotCache(model.config.num_hidden_layers, slots, max_len)
        if getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager", None):
            _register_attention()
            model.config._attn_implementation = ATTENTION  # same results as SDPA for every other caller
        if compile:  # one graph per (rows, kv_len) bucket: past dynamo's recompile limit it would run eagerly
            import torch._dynamo.config as dynamo_config

            graphs = slots.bit_length() * bucket(max_len, KV_BUCKET) // KV_BUCKET + 8  # + 8: the other callers'
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, graphs)
        self._decode = self._forward
        if compile:  # the model's modules do not change under an engine: no guards on them (see _own_copy)
            self._decode = torch.compile(_own_copy(self._forward), dynamic=False,
                                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(tokens, position_ids=positions, attention_mask=mask, cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]  # (B, V)

    @torch.inference_mode()
    def step(self, start: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B, T) for slots start..start+B-1 -> logits (B, V) of each row's last token."""
        last = int(positions.max())
        if last >= self.max_len:
            raise ValueError(f"the engine's cache holds {self.max_len} tokens a sequence; generation went past it")
        kv_len = bucket(last + 1, KV_BUCKET)  # whole cache blocks (the last may reach past max_len: masked)
        self.cache.begin_step(start, positions, kv_len)
        # (B, 1, T, kv_len): row b's token t sees the positions up to its own (stale slot data lies beyond)
        mask = torch.arange(kv_len, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
        if tokens.shape[1] == 1:
            logits = self._decode(tokens, positions, mask)
            return logits.clone() if self.compiled else logits  # compiled graphs may reuse their output buffer
        return self._forward(tokens, positions, mask)

    def prefill(self, slot: int, prompt_ids: list[int], start_pos: int = 0) -> torch.Tensor:
        """One sequence's prompt (or a chunk of it, from start_pos) into `slot` -> logits (1, V) of its end."""
        ids = torch.tensor([prompt_ids], device=self.device)
        pos = torch.arange(start_pos, start_pos + len(prompt_ids), device=self.device)[None]
        return self.step(slot, ids, pos)

    @torch.inference_mode()
    def prefill_many(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Prompt chunks of several sequences in one forward: [(slot, ids, start_pos)] -> logits (n, V) at
        the end of each chunk. Rows are right-padded to the longest chunk; a padding token writes K/V at
        positions after its row's chunk, which that row's own later tokens overwrite before reading them
        (a sequence never reaches max_len - 1 in its prompt, so the clamp never lands on a real token)."""
        if len(chunks) == 1:
            slot, ids, start = chunks[0]
            return self.prefill(slot, ids, start)
        dev, width = self.device, max(len(ids) for _, ids, _ in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.empty(len(chunks), width, dtype=torch.long)
        for r, (_, ids, start) in enumerate(chunks):
            tokens[r, : len(ids)] = torch.tensor(ids)
            positions[r] = torch.arange(start, start + width).clamp_(max=self.max_len - 1)
        ends = torch.tensor([len(ids) - 1 for _, ids, _ in chunks])  # (n,) each row's last real column
        keep = ends.unique()  # the columns whose logits are computed (usually one: equal chunk lengths)
        tokens, positions = tokens.to(dev), positions.to(dev)
        kv_len = bucket(int(positions.max()) + 1, KV_BUCKET)
        self.cache.begin_step(0, positions, kv_len, slots=torch.tensor([c[0] for c in chunks], device=dev))
        mask = torch.arange(kv_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]
        try:
            out = self.model(tokens, position_ids=positions, attention_mask=mask, cache=self.cache,
                             use_cache=True, logits_to_keep=keep.to(dev))
        finally:
            self.cache.slot_ids = None
        col = (ends[:, None] == keep[None, :]).int().argmax(-1)  # (n,) where each row's end is in `keep`
        return out.logits[torch.arange(len(chunks)), col.to(dev)]  # (n, V)
