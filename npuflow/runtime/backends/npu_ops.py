"""Pure-torch references of the torch_npu 2.13.0 ops the NPU runtime calls: same names, parameters, outputs.

Each function mirrors the signature in torch_npu 2.13.0's `torch_npu/_op_plugin_docs.py` (the contract test
`tests/unit/test_torch_npu_contract.py` checks names, order and defaults against it), so
`npu_model.apply_fused_ops(model, npu_ops)` runs on CPU exactly what `apply_fused_ops(model, torch_npu)` runs on an
NPU. Differences from the device kernels, on purpose:
- dtype limits are not enforced (several kernels take only float16/bfloat16); the float32 CPU tests need float32.
- Math is done in float32 and cast back, where the kernel may round intermediates to float16/bfloat16.
- Quantized-attention, paged-KV (block_table), prefix, rope-split (MLA) and dropout paths raise NotImplementedError.
Where torch_npu names the first tensor `self`, the reference calls it `input`: torch's Python binding renames
`self` to `input` outside method bindings (torchgen/api/python.py), and libtorch_npu.so's parser strings in the
2.13.0 wheel read e.g. `npu_rms_norm(Tensor input, Tensor gamma, float epsilon=1e-06)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT_MAX = 2147483647  # the kernels' "no limit" value for pre_tokens / next_tokens
_SOFTMAX_STAT_WIDTH = 8  # npu_fusion_attention stores softmax max/sum repeated 8 times: (B, N, Sq, 8)


def _unsupported(op: str, **params: object) -> None:
    given = sorted(name for name, value in params.items() if value is not None)
    if given:
        raise NotImplementedError(f"{op} reference: {', '.join(given)} not implemented (device-only path)")


# ---- RMSNorm family -------------------------------------------------------------------------------------------


def npu_rms_norm(input: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """torch_npu.npu_rms_norm (_op_plugin_docs.py "npu_rms_norm"): y = x * rsqrt(mean(x^2) + eps) * gamma."""
    # input (..., *gamma.shape); the mean runs over the trailing gamma.dim() axes
    dims = tuple(range(-gamma.dim(), 0))
    x = input.float()
    rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + epsilon)  # (..., 1) float32, "reverse rms"
    y = (x * rstd * gamma.float()).to(input.dtype)
    return y, rstd


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """torch_npu.npu_add_rms_norm (schema only, undocumented in 2.13.0): x = x1 + x2, y = rms_norm(x) -> (y, rstd, x)."""
    x = x1 + x2  # (..., H) in the input dtype: the residual stream the next block adds to
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x


def npu_add_rms_norm_cast(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """torch_npu.npu_add_rms_norm_cast (_op_plugin_docs.py): add_rms_norm with y also as float32 -> (y1, y2, rstd, x)."""
    x = x1 + x2
    dims = tuple(range(-gamma.dim(), 0))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + epsilon)
    y1 = xf * rstd * gamma.float()  # float32
    return y1, y1.to(x1.dtype), rstd, x


# ---- rotary position embedding --------------------------------------------------------------------------------


def _rotated(x: torch.Tensor, rotary_mode: str) -> torch.Tensor:
    """The partner term: half: cat(-x2, x1) (HF Llama rotate_half, GPT-NeoX); interleave: (-x_odd, x_even) pairs (GPT-J)."""
    if rotary_mode == "half":
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    if rotary_mode == "interleave":
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    raise ValueError(f"Invalid rotary_mode {rotary_mode!r}; choose 'half' or 'interleave'")


def npu_rotary_mul(
    input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half", rotate: torch.Tensor | None = None
) -> torch.Tensor:
    """torch_npu.npu_rotary_mul (_op_plugin_docs.py "npu_rotary_mul"): r1 * x + r2 * rotated(x)."""
    # input (B, N, S, D) BNSD, (B, S, N, D) BSND or (S, B, N, D) SBND; r1 = cos, r2 = sin broadcastable to it,
    # e.g. (B, 1, S, D) for BNSD. rotate (D, D), when given, replaces the mode's permutation: rotated = x @ rotate.
    x_new = input @ rotate if rotate is not None else _rotated(input, rotary_mode)
    return r1 * input + r2 * x_new


def npu_apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "BSND",
    rotary_mode: str = "half",
):
    """torch_npu.npu_apply_rotary_pos_emb (_op_plugin_docs.py): rotary on query and key, updated in place."""
    # query (B, S, Nq, D), key (B, S, Nk, D), cos/sin (B, S, 1, D) for "BSND"; (T, N, D) / (T, 1, D) for "TND"
    if layout not in ("BSND", "SBND", "BNSD", "TND"):
        raise ValueError(f"Invalid layout {layout!r}; choose one of BSND, SBND, BNSD, TND")
    if rotary_mode not in ("half", "interleave"):
        raise NotImplementedError(f"npu_apply_rotary_pos_emb reference: rotary_mode {rotary_mode!r}")
    q_out = cos * query + sin * _rotated(query, rotary_mode)
    k_out = cos * key + sin * _rotated(key, rotary_mode)
    return query.copy_(q_out), key.copy_(k_out)


# ---- attention ------------------------------------------------------------------------------------------------


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """Any supported layout -> (B, N, S, D)."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":  # (B, S, N*D)
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(1, 2)
    if layout == "SBH":  # (S, B, N*D)
        s, b, h = x.shape
        return x.reshape(s, b, heads, h // heads).permute(1, 2, 0, 3)
    raise NotImplementedError(f"attention reference: input_layout {layout!r} (supported: BSH, SBH, BSND, BNSD)")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> the output layout."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    raise NotImplementedError(f"attention reference: output layout {layout!r}")


def _kv_heads(query: torch.Tensor, key: torch.Tensor, layout: str, num_heads: int, num_kv_heads: int) -> int:
    """Key/value head count; raises where the kernel would: N not matching the shape, Nq not a multiple of Nkv."""
    n_kv = num_kv_heads or num_heads
    if layout in ("BSH", "SBH"):
        d = query.shape[-1] // num_heads
        if key.shape[-1] != n_kv * d:
            raise ValueError(f"key hidden size {key.shape[-1]} != num_key_value_heads {n_kv} * head_dim {d}")
    else:
        n_axis = 1 if layout.startswith("BN") else 2
        if query.shape[n_axis] != num_heads:
            raise ValueError(f"query has {query.shape[n_axis]} heads in {layout}, num_heads is {num_heads}")
        if key.shape[n_axis] != n_kv:
            raise ValueError(f"key has {key.shape[n_axis]} heads in {layout}, num_key_value_heads gives {n_kv}")
    if num_heads % n_kv:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_key_value_heads {n_kv}")
    return n_kv


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, excluded: torch.Tensor | None):
    """softmax(scale * q @ k^T, excluded positions dropped) @ v in float32 -> (out, row_max, row_sum)."""
    # q (B, N, Sq, D); k, v (B, Nkv, Skv, D); excluded bool broadcastable to (B, N, Sq, Skv), True = masked out.
    # GQA: query head h reads kv head h // (N // Nkv), the grouping of HF's repeat_kv.
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # (B, N, Sq, Skv)
    if excluded is not None:
        scores = scores.masked_fill(excluded, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)  # fully masked rows
    p = torch.exp(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p / row_sum.clamp_min(torch.finfo(torch.float32).tiny), v)  # fully masked rows -> 0
    return out.to(q.dtype), row_max, row_sum


def _sparse_excluded(
    sparse_mode: int, atten_mask: torch.Tensor | None, sq: int, skv: int, pre_tokens: int, next_tokens: int
) -> torch.Tensor | None:
    """The positions a sparse_mode removes (True = masked out), or None for full attention."""
    # 0 defaultMask: atten_mask (SS / 11SS / B1SS / BNSS) within the pre/next band, origin top-left;
    # 1 allMask: atten_mask as given; 2 leftUpCausal; 3 rightDownCausal; 4 band, origin bottom-right.
    # Modes 2-4 take the compressed (2048, 2048) upper-triangular mask, whose content the geometry replaces.
    if atten_mask is None:
        return None  # documented: no mask -> sparse_mode, pre_tokens and next_tokens have no effect
    device = atten_mask.device
    i = torch.arange(sq, device=device).unsqueeze(-1)  # query position, (Sq, 1)
    j = torch.arange(skv, device=device).unsqueeze(0)  # key position, (1, Skv)
    if sparse_mode == 0:
        return atten_mask.bool() | (j - i > next_tokens) | (i - j > pre_tokens)
    if sparse_mode == 1:
        return atten_mask.bool()
    if sparse_mode == 2:
        return j > i
    if sparse_mode == 3:
        return j > i + (skv - sq)
    if sparse_mode == 4:
        diag = i + (skv - sq)
        return (j - diag > next_tokens) | (diag - j > pre_tokens)
    raise NotImplementedError(f"attention reference: sparse_mode {sparse_mode} (supported: 0-4)")


def _kv_length_excluded(lengths, b: int, skv: int, device: torch.device) -> torch.Tensor | None:
    """actual_seq_lengths(_kv): key positions at or past each batch's valid length -> (B, 1, 1, Skv) True."""
    if lengths is None:
        return None
    valid = torch.as_tensor(list(lengths), device=device).reshape(-1)
    valid = valid.expand(b) if valid.numel() == 1 else valid[:b]
    return (torch.arange(skv, device=device) >= valid.unsqueeze(-1)).view(b, 1, 1, skv)


def _either(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b


def npu_fusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_num: int,
    input_layout: str,
    pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    keep_prob: float = 1.0,
    pre_tockens: int = INT_MAX,
    next_tockens: int = INT_MAX,
    inner_precise: int = 0,
    prefix: list[int] | None = None,
    actual_seq_qlen: list[int] | None = None,
    actual_seq_kvlen: list[int] | None = None,
    sparse_mode: int = 0,
    gen_mask_parallel: bool = True,
    sync: bool = False,
    softmax_layout: str = "",
):
    """torch_npu.npu_fusion_attention (_op_plugin_docs.py "npu_fusion_attention"): softmax(mask(scale*QK^T))V."""
    # query (B, Sq, N*D) for "BSH", (B, Sq, N, D) "BSND", (B, N, Sq, D) "BNSD", (Sq, B, N*D) "SBH";
    # key/value the same with Nkv heads (GQA when N / Nkv > 1). atten_mask: bool/uint8, 1 = masked out.
    # -> (attention_out in input_layout, softmax_max (B, N, Sq, 8) f32, softmax_sum (B, N, Sq, 8) f32,
    #     softmax_out (reserved, empty), seed, offset, numels): the tuple of the kernel.
    _unsupported("npu_fusion_attention", pse=pse, padding_mask=padding_mask, prefix=prefix,
                 actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen)
    if keep_prob != 1.0:
        raise NotImplementedError("npu_fusion_attention reference: dropout (keep_prob < 1)")
    if input_layout in ("BSH", "SBH"):
        n_kv = key.shape[-1] // (query.shape[-1] // head_num)
    else:
        n_kv = key.shape[1 if input_layout == "BNSD" else 2]
    _kv_heads(query, key, input_layout, head_num, n_kv)
    q = _to_bnsd(query, input_layout, head_num)
    k, v = _to_bnsd(key, input_layout, n_kv), _to_bnsd(value, input_layout, n_kv)
    b, n, sq = q.shape[:3]
    excluded = _sparse_excluded(sparse_mode, atten_mask, sq, k.shape[2], pre_tockens, next_tockens)
    out, row_max, row_sum = _attend(q, k, v, scale, excluded)
    stat_shape = (b, n, sq, _SOFTMAX_STAT_WIDTH)
    return (
        _from_bnsd(out, input_layout),
        row_max.expand(stat_shape).contiguous(),
        row_sum.expand(stat_shape).contiguous(),
        query.new_empty(0),
        0,
        0,
        0,
    )


def npu_incre_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    padding_mask: torch.Tensor | None = None,
    pse_shift: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    dequant_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    dequant_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    kv_padding_size: torch.Tensor | None = None,
    num_heads: int = 1,
    scale_value: float = 1.0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    block_size: int = 0,
    inner_precise: int = 1,
) -> torch.Tensor:
    """torch_npu.npu_incre_flash_attention (_op_plugin_docs.py): one decode step against a KV cache."""
    # query (B, 1, N*D) "BSH", (B, N, 1, D) "BNSD" or (B, 1, N, D) "BSND"; key/value (B, Skv, Nkv*D) / (B, Nkv, Skv, D)
    # / (B, Skv, Nkv, D). num_key_value_heads 0 means Nkv = num_heads. atten_mask (B, Skv) or (B, 1, 1, Skv),
    # 1 = masked out; actual_seq_lengths: valid cache length per batch. -> attention_out shaped like query.
    _unsupported("npu_incre_flash_attention", padding_mask=padding_mask, pse_shift=pse_shift,
                 dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
                 quant_scale2=quant_scale2, quant_offset2=quant_offset2, antiquant_scale=antiquant_scale,
                 antiquant_offset=antiquant_offset, block_table=block_table, kv_padding_size=kv_padding_size)
    if input_layout not in ("BSH", "BSND", "BNSD"):
        raise ValueError(f"Invalid input_layout {input_layout!r}; choose one of BSH, BSND, BNSD")
    n_kv = _kv_heads(query, key, input_layout, num_heads, num_key_value_heads)
    q = _to_bnsd(query, input_layout, num_heads)
    k, v = _to_bnsd(key, input_layout, n_kv), _to_bnsd(value, input_layout, n_kv)
    b, skv = q.shape[0], k.shape[2]
    excluded = None if atten_mask is None else atten_mask.bool().reshape(atten_mask.shape[0], 1, 1, skv)
    excluded = _either(excluded, _kv_length_excluded(actual_seq_lengths, b, skv, q.device))
    out, _, _ = _attend(q, k, v, scale_value, excluded)
    return _from_bnsd(out, input_layout)


def _fia_user_mask(atten_mask: torch.Tensor, sq: int) -> torch.Tensor:
    """npu_fused_infer_attention_score's mask shapes -> 4-D: (B, KV_S) when Q_S is 1, (Q_S, KV_S), (1, Q_S, KV_S)."""
    if atten_mask.dim() == 2:
        return atten_mask.reshape(atten_mask.shape[0], 1, 1, -1) if sq == 1 else atten_mask[None, None]
    if atten_mask.dim() == 3:
        return atten_mask.unsqueeze(1)
    return atten_mask


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pse_shift: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: list[int] | None = None,
    actual_seq_lengths_kv: list[int] | None = None,
    dequant_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    dequant_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    query_padding_size: torch.Tensor | None = None,
    kv_padding_size: torch.Tensor | None = None,
    key_antiquant_scale: torch.Tensor | None = None,
    key_antiquant_offset: torch.Tensor | None = None,
    value_antiquant_scale: torch.Tensor | None = None,
    value_antiquant_offset: torch.Tensor | None = None,
    key_shared_prefix: torch.Tensor | None = None,
    value_shared_prefix: torch.Tensor | None = None,
    actual_shared_prefix_len: torch.Tensor | None = None,
    query_rope: torch.Tensor | None = None,
    key_rope: torch.Tensor | None = None,
    key_rope_antiquant_scale: torch.Tensor | None = None,
    num_heads: int = 1,
    scale: float = 1.0,
    pre_tokens: int = INT_MAX,
    next_tokens: int = INT_MAX,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    antiquant_mode: int = 0,
    softmax_lse_flag: bool = False,
    key_antiquant_mode: int = 0,
    value_antiquant_mode: int = 0,
):
    """torch_npu.npu_fused_infer_attention_score (_op_plugin_docs.py): prefill (Q_S > 1) and decode (Q_S = 1)."""
    # Layouts as npu_incre_flash_attention plus "BNSD_BSND" (BNSD in, BSND out, Q_S > 1 only). For Q_S = 1,
    # sparse_mode/pre_tokens/next_tokens have no effect (documented). -> (attention_out, softmax_lse), softmax_lse
    # (B, N, Q_S, 1) float32 = log(sum(exp(s - max))) + max when softmax_lse_flag, else a (1,) zero tensor.
    _unsupported("npu_fused_infer_attention_score", pse_shift=pse_shift, dequant_scale1=dequant_scale1,
                 quant_scale1=quant_scale1, dequant_scale2=dequant_scale2, quant_scale2=quant_scale2,
                 quant_offset2=quant_offset2, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                 block_table=block_table, query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                 key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
                 value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
                 key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                 actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
                 key_rope_antiquant_scale=key_rope_antiquant_scale)
    in_layout, out_layout = ("BNSD", "BSND") if input_layout == "BNSD_BSND" else (input_layout, input_layout)
    if in_layout not in ("BSH", "BSND", "BNSD"):
        raise NotImplementedError(f"npu_fused_infer_attention_score reference: input_layout {input_layout!r}")
    n_kv = _kv_heads(query, key, in_layout, num_heads, num_key_value_heads)
    q = _to_bnsd(query, in_layout, num_heads)
    k, v = _to_bnsd(key, in_layout, n_kv), _to_bnsd(value, in_layout, n_kv)
    b, sq, skv = q.shape[0], q.shape[2], k.shape[2]
    if sq == 1:
        excluded = None if atten_mask is None else _fia_user_mask(atten_mask, sq).bool()
    else:
        if actual_seq_lengths is not None:
            raise NotImplementedError("npu_fused_infer_attention_score reference: actual_seq_lengths with Q_S > 1")
        user = None if atten_mask is None else _fia_user_mask(atten_mask, sq)
        excluded = _sparse_excluded(sparse_mode, user, sq, skv, pre_tokens, next_tokens)
    excluded = _either(excluded, _kv_length_excluded(actual_seq_lengths_kv, b, skv, q.device))
    out, row_max, row_sum = _attend(q, k, v, scale, excluded)
    lse = torch.log(row_sum) + row_max if softmax_lse_flag else torch.zeros(1, device=q.device)
    return _from_bnsd(out, out_layout), lse


# ---- MLP activation -------------------------------------------------------------------------------------------


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch_npu.npu_swiglu (_op_plugin_docs.py "npu_swiglu"): A, B = chunk(x, 2, dim); silu(A) * B."""
    # input (..., 2 * I) = [gate, up] along dim -> (..., I)
    a, b = torch.chunk(input, 2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(input.dtype)


# ---- weight-only quantized matmul -----------------------------------------------------------------------------


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """torch_npu.npu_convert_weight_to_int4pack (_op_plugin_docs.py): 8 int4 values per int32 along the last dim."""
    # weight (d0, d1) int32 in [-8, 7], d1 % 8 == 0 -> (d0, d1 // 8) int32. Value j of each run of 8 is the
    # two's-complement nibble at bits 4j..4j+3 (lowest first). The docs say only "交叠排放" (interleaved); this bit
    # order is inferred from NPU code that uses `int8_nibble_pairs.view(torch.int32)` interchangeably with the op's
    # output (sglang's NPU W4A16 MoE), and is unverified on a device. inner_k_tiles is reserved (unused).
    if weight.dtype != torch.int32 or weight.dim() != 2 or weight.shape[-1] % 8:
        raise ValueError(f"weight must be 2-D int32 with the last dim a multiple of 8, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if weight.numel() and (weight.min() < -8 or weight.max() > 7):
        raise ValueError("weight values must lie in the int4 range [-8, 7]")
    d0, d1 = weight.shape
    nibbles = (weight.to(torch.int64) & 0xF).reshape(d0, d1 // 8, 8)
    shifts = 4 * torch.arange(8, dtype=torch.int64, device=weight.device)
    packed = (nibbles << shifts).sum(dim=-1)  # (d0, d1 // 8) in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of npu_convert_weight_to_int4pack (npuflow's, not a torch_npu op): (d0, n) int32 -> (d0, 8n) int32."""
    shifts = 4 * torch.arange(8, dtype=torch.int64, device=packed.device)
    nibbles = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF  # (d0, n, 8) in [0, 15]
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.flatten(-2).to(torch.int32)


def _weight_kn(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The integer weight as (K, N): int8 (K, N), or int4-packed int32 (K, N/8) / transposed (N, K/8).T = (K/8, N)."""
    if weight.dtype == torch.int8:
        return weight
    if weight.dtype != torch.int32:
        raise ValueError(f"weight must be int8 or int32 (int4 pack), got {weight.dtype}")
    if weight.shape[0] == k:  # packed along N: (K, N/8)
        return unpack_int4pack(weight)
    if weight.shape[0] * 8 == k:  # an (N, K/8) pack passed transposed: (K/8, N)
        return unpack_int4pack(weight.transpose(-1, -2)).transpose(-1, -2)
    raise ValueError(f"int4-packed weight {tuple(weight.shape)} does not fit K={k}")


def npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: torch.Tensor | None = None,
    quant_scale: torch.Tensor | None = None,
    quant_offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
) -> torch.Tensor:
    """torch_npu.npu_weight_quant_batchmatmul (_op_plugin_docs.py): y = x @ ((weight + offset) * scale) + bias."""
    # x (M, K) float16/bfloat16; weight (K, N) int8, or int32 carrying int4 (see _weight_kn), transposed views allowed.
    # antiquant_scale/offset: per-tensor (1,) / (1, 1), per-channel (N,) / (1, N), per-group (ceil(K/g), N) with
    # g = antiquant_group_size. Formula as CANN's aclnnWeightQuantBatchMatmulV2: ANTIQUANT(w) = (w + offset) * scale.
    # quant_scale/offset (float32, (N,) or (1, N)) quantize the output to int8: round(y * qs + qo).
    if antiquant_scale.dtype == torch.int64 or (quant_scale is not None and quant_scale.dtype == torch.int64):
        raise NotImplementedError("npu_weight_quant_batchmatmul reference: int64 scales from npu_trans_quant_param")
    k = x.shape[-1]
    w = _weight_kn(weight, k).float()  # (K, N)
    scale = antiquant_scale.float()
    offset = None if antiquant_offset is None else antiquant_offset.float()
    if antiquant_group_size > 0:  # (ceil(K/g), N) -> one row per K
        scale = scale.repeat_interleave(antiquant_group_size, dim=0)[:k]
        offset = None if offset is None else offset.repeat_interleave(antiquant_group_size, dim=0)[:k]
    w = (w + offset) * scale if offset is not None else w * scale
    y = x.float() @ w  # (M, N) float32
    if bias is not None:
        y = y + bias.float()
    if quant_scale is None:
        return y.to(x.dtype)
    y = y * quant_scale.float() + (0.0 if quant_offset is None else quant_offset.float())
    return torch.round(y).clamp(-128, 127).to(torch.int8)


# ---- W8A8: activation quantization and the int8 x int8 matmul -------------------------------------------------


def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                      group_index: torch.Tensor | None = None, dst_type=None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_npu.npu_dynamic_quant (_op_plugin_docs.py): symmetric int8 per token (row of the last dim).

    x (..., K) float16/bfloat16 -> (y int8 (..., K), scale float32 (...)), y = round(x * smooth / scale) with
    scale = rowmax|x * smooth| / 127.
    """
    if group_index is not None or dst_type not in (None, torch.int8):
        _unsupported("npu_dynamic_quant", group_index=group_index, dst_type=dst_type)
    xf = x.float() * (smooth_scales.float() if smooth_scales is not None else 1.0)
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # (...)
    return (xf / scale[..., None]).round().clamp(-128, 127).to(torch.int8), scale


def npu_quantize(input: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, dtype: int,
                 axis: int = 1, div_mode: bool = True) -> torch.Tensor:
    """torch_npu.npu_quantize: round(input / scales + zero_points) (div_mode) or round(input * scales +
    zero_points) to int8 (dtype torch.qint8 or torch.int8); scales/zero_points broadcast along `axis`."""
    if dtype not in (torch.qint8, torch.int8):
        _unsupported("npu_quantize", dtype=dtype)
    shape = [1] * input.dim()
    if scales.numel() > 1:
        shape[axis] = scales.numel()
    s = scales.float().reshape(shape)
    y = input.float() / s if div_mode else input.float() * s
    if zero_points is not None:
        y = y + zero_points.float().reshape(shape)
    return y.round().clamp(-128, 127).to(torch.int8)


def npu_trans_quant_param(scale: torch.Tensor, offset: torch.Tensor | None = None, round_mode: int = 0) -> torch.Tensor:
    """torch_npu.npu_trans_quant_param: float32 scale (t,) -> int64 (t,) for npu_quant_matmul with fp16 output.
    The reference keeps the float32 bit pattern in the low 32 bits (what msModelSlim's deqscale2int64 writes);
    npu_quant_matmul's reference reads it back the same way."""
    if offset is not None:
        _unsupported("npu_trans_quant_param", offset=offset)
    return scale.float().reshape(-1).contiguous().view(torch.int32).to(torch.int64)


def _scale_float(scale: torch.Tensor) -> torch.Tensor:
    """npu_quant_matmul's scale as float32: int64 scales carry the float32 bits in their low 32 bits."""
    if scale.dtype == torch.int64:
        return (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return scale.float()


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset: torch.Tensor | None = None,
                     pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     output_dtype=None) -> torch.Tensor:
    """torch_npu.npu_quant_matmul (_op_plugin_docs.py), int8 x int8:
    bias int32: y = (x1 @ x2 + bias) * scale [* pertoken_scale]; float bias: y = x1 @ x2 * scale [* pts] + bias.

    x1 int8 (M, K); x2 int8 (K, N) (a transposed (N, K) weight); scale (N,) or (1,) float32/bfloat16, or
    int64 from npu_trans_quant_param; pertoken_scale float32 (M,); output_dtype None means int8.
    """
    _unsupported("npu_quant_matmul", offset=offset)
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise NotImplementedError(f"npu_quant_matmul reference: int8 x int8 only, got {x1.dtype} x {x2.dtype}")
    acc = x1.double() @ x2.double()  # (M, N) exact integer sums, as the int32 accumulator
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.double()
    y = acc * _scale_float(scale).double()
    if pertoken_scale is not None:
        y = y * pertoken_scale.double()[..., None]
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.double()
    if output_dtype in (None, torch.int8):
        return y.round().clamp(-128, 127).to(torch.int8)
    return y.to(output_dtype)


__all__ = [
    "npu_add_rms_norm",
    "npu_add_rms_norm_cast",
    "npu_apply_rotary_pos_emb",
    "npu_convert_weight_to_int4pack",
    "npu_dynamic_quant",
    "npu_fused_infer_attention_score",
    "npu_fusion_attention",
    "npu_incre_flash_attention",
    "npu_quant_matmul",
    "npu_quantize",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
    "npu_trans_quant_param",
    "npu_weight_quant_batchmatmul",
    "unpack_int4pack",
]
