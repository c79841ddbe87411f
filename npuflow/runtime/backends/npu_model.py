"""Route a transformers LlamaForCausalLM's norms, rotary, attention and SwiGLU through torch_npu's fused ops.

`apply_fused_ops(model, ops)` re-classes, in place, each LlamaRMSNorm, LlamaMLP, LlamaAttention and
LlamaDecoderLayer to a subclass that only replaces `forward`: weights, state_dict keys, hooks and isinstance checks
(transformers' output capturing) are unchanged, and Linear layers (float or npuflow's quantized ones) are untouched.
`ops` is `torch_npu` on an NPU or `npuflow.runtime.backends.npu_ops` (the pure-torch references) anywhere else.

Per decoder layer:
- input_layernorm, final norm: npu_rms_norm
- residual add + post_attention_layernorm: npu_add_rms_norm (one kernel, returns the new residual too)
- q/k rotary: npu_rotary_mul, BNSD input with cos/sin as B1SD (HF's rotate_half convention = rotary_mode "half")
- attention, attention="fusion": npu_fusion_attention (prefill) + npu_incre_flash_attention (one-token decode);
  attention="fused_infer": npu_fused_infer_attention_score for both. GQA is native (num_key_value_heads), no repeat_kv.
- MLP: npu_swiglu on cat([gate_proj(x), up_proj(x)], -1); the projections stay separate modules.
Masks: with `config._attn_implementation` "sdpa" (the default), transformers passes None where SDPA's is_causal
(top-left aligned) is right, also for a static cache's empty tail (-> sparse_mode 2, leftUpCausal, with the
compressed 2048x2048 mask), and a boolean mask otherwise, e.g. padding (-> inverted to True = masked out, then
sparse_mode 1 / the decode kernel's atten_mask).
Not covered: the residual add at the end of a layer is not fused with the next layer's input_layernorm (that needs
LlamaModel.forward rewritten); no paged KV cache (block_table) or actual_seq_lengths; graph mode (torchair) is
the caller's business, and npu_fusion_attention is documented as eager-only, so use attention="fused_infer" there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

CAUSAL_TILE = 2048  # sparse_mode 2/3/4 take a compressed (2048, 2048) mask, True above the diagonal


class _OpsRef:
    """The op namespace (a module such as torch_npu) held so that deepcopy shares it instead of failing on it."""

    __slots__ = ("ops",)

    def __init__(self, ops) -> None:
        self.ops = ops

    def __deepcopy__(self, memo) -> _OpsRef:
        return self


@cache
def _causal_tile(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(CAUSAL_TILE, CAUSAL_TILE, dtype=torch.bool, device=device), diagonal=1)


def _excluded(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' mask (bool, True = attend; or additive float) -> the kernels' convention, True = masked out."""
    if attention_mask is None:
        return None
    return ~attention_mask if attention_mask.dtype == torch.bool else attention_mask < 0


def _attention_fusion(ops, module: LlamaAttention, q, k, v, attention_mask) -> torch.Tensor:
    """npu_fusion_attention for prefill, npu_incre_flash_attention for one-token decode; BNSD in and out."""
    # q (B, N, Sq, D); k, v (B, Nkv, Skv, D) with the cache; attention_mask (B, 1, Sq, Skv) or None
    n, sq, n_kv = q.shape[1], q.shape[2], k.shape[1]
    excluded = _excluded(attention_mask)
    if sq == 1:
        return ops.npu_incre_flash_attention(
            q, k, v, atten_mask=excluded, num_heads=n, scale_value=module.scaling, input_layout="BNSD",
            num_key_value_heads=n_kv,
        )
    # None = SDPA's is_causal: top-left aligned (leftUpCausal, 2), not right-down (3): with a static cache Skv > Sq
    atten_mask, sparse_mode = (_causal_tile(q.device), 2) if excluded is None else (excluded, 1)
    out = ops.npu_fusion_attention(
        q, k, v, n, "BNSD", atten_mask=atten_mask, scale=module.scaling, sparse_mode=sparse_mode
    )
    return out[0]


def _attention_fused_infer(ops, module: LlamaAttention, q, k, v, attention_mask) -> torch.Tensor:
    """npu_fused_infer_attention_score for prefill and decode (the inference kernel, graph-mode capable); BNSD."""
    n, sq, n_kv = q.shape[1], q.shape[2], k.shape[1]
    excluded = _excluded(attention_mask)
    if sq > 1 and excluded is None:
        atten_mask, sparse_mode = _causal_tile(q.device), 2  # top-left aligned, as in _attention_fusion
    else:  # decode ignores sparse_mode; a given prefill mask is used in full
        atten_mask, sparse_mode = excluded, 1 if excluded is not None else 0
    out, _ = ops.npu_fused_infer_attention_score(
        q, k, v, atten_mask=atten_mask, num_heads=n, scale=module.scaling, input_layout="BNSD",
        num_key_value_heads=n_kv, sparse_mode=sparse_mode,
    )
    return out


ATTENTION: dict[str, Callable[..., torch.Tensor]] = {
    "fusion": _attention_fusion,
    "fused_infer": _attention_fused_infer,
}


class NpuRMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm through npu_rms_norm."""

    fused_ops: _OpsRef

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        ops = self.fused_ops.ops
        return ops.npu_rms_norm(hidden_states, self.weight, epsilon=self.variance_epsilon)[0]


class NpuMLP(LlamaMLP):
    """LlamaMLP with SiLU(gate) * up done by npu_swiglu on the concatenated projections."""

    fused_ops: _OpsRef

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        ops = self.fused_ops.ops
        gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)  # (..., 2I): [gate | up], npu_swiglu's A|B
        return self.down_proj(ops.npu_swiglu(gate_up, dim=-1))


class NpuAttention(LlamaAttention):
    """LlamaAttention with npu_rotary_mul and a fused attention kernel (see ATTENTION); GQA without repeat_kv."""

    fused_ops: _OpsRef
    fused_attention: Callable[..., torch.Tensor]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        ops = self.fused_ops.ops
        input_shape = hidden_states.shape[:-1]  # (B, S)
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, N, S, D)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Nkv, S, D)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Nkv, S, D)
        cos, sin = position_embeddings  # (B, S, D) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D): r1/r2 in the B1SD layout of a BNSD input
        q = ops.npu_rotary_mul(q, cos, sin)
        k = ops.npu_rotary_mul(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)  # (B, Nkv, Skv, D)
            if k.dim() == 5:  # the engine's cache blocks of a decode step: the fused kernels take K, V whole
                from npuflow.runtime.engine import dense_blocks

                k, v = dense_blocks(k), dense_blocks(v)
        out = self.fused_attention(ops, self, q, k, v, attention_mask)  # (B, N, S, D)
        out = out.transpose(1, 2).reshape(*input_shape, -1)  # (B, S, N*D)
        return self.o_proj(out), None


class NpuDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer with the post-attention residual add and RMSNorm in one npu_add_rms_norm."""

    fused_ops: _OpsRef

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:  # (B, S, H) -> (B, S, H)
        ops = self.fused_ops.ops
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        norm = self.post_attention_layernorm
        hidden_states, _, residual = ops.npu_add_rms_norm(residual, hidden_states, norm.weight, norm.variance_epsilon)
        return residual + self.mlp(hidden_states)


FUSED: dict[type[nn.Module], type[nn.Module]] = {
    LlamaRMSNorm: NpuRMSNorm,
    LlamaMLP: NpuMLP,
    LlamaAttention: NpuAttention,
    LlamaDecoderLayer: NpuDecoderLayer,
}
REQUIRED_OPS = {
    "fusion": ("npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention",
               "npu_incre_flash_attention"),
    "fused_infer": ("npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul", "npu_swiglu",
                    "npu_fused_infer_attention_score"),
}


def apply_fused_ops(model: nn.Module, ops, attention: str = "fusion") -> nn.Module:
    """Make `model`'s Llama blocks run `ops`' fused kernels (in place; returns `model`). Re-applying re-targets."""
    if attention not in ATTENTION:
        raise ValueError(f"Invalid attention {attention!r}; choose one of {sorted(ATTENTION)}")
    missing = [name for name in REQUIRED_OPS[attention] if not callable(getattr(ops, name, None))]
    if missing:
        raise ValueError(f"{ops!r} lacks the ops {missing} needed for attention={attention!r}")
    ref, swapped = _OpsRef(ops), 0
    for module in model.modules():
        cls = type(module)
        fused = FUSED.get(cls) or (cls if cls in FUSED.values() else None)  # exact types: subclasses are left alone
        if fused is None or (fused is NpuMLP and module.config.hidden_act != "silu"):  # npu_swiglu is SiLU-gated
            continue
        module.__class__ = fused
        module.fused_ops = ref
        if fused is NpuAttention:
            module.fused_attention = ATTENTION[attention]
        swapped += 1
    if not swapped:
        raise ValueError(f"{type(model).__name__} has no Llama modules to fuse (expected a LlamaForCausalLM)")
    return model
