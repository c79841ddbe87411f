"""Capacity planning from first principles: weight and KV memory, device counts, TPOT bounds per mode.

Decode is memory-bound: each generated token reads every weight once plus the KV cache of its
sequence, so TPOT >= bytes read / memory bandwidth. Tensor parallelism splits those bytes over N
devices and adds two all-reduces per layer; pipeline parallelism splits memory but a token still
crosses every stage in turn, adding one activation hop per stage boundary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from npuflow.bench.devices import DeviceSpec, get_device
from npuflow.core.errors import ConfigError

Precision = Literal["fp16", "w8a16", "w4a16"]
MODES = ("single", "pipeline-parallel", "tensor-parallel")
USABLE_FRACTION = 0.9  # of device memory for weights + KV (the rest: runtime, activations, fragmentation)
MBU_RANGE = (0.5, 0.8)  # achieved / peak bandwidth when nothing was measured (typical decode kernels)


class ModelShape(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    layers: int
    hidden: int  # d_model
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # intermediate size
    vocab: int
    tied: bool = False  # lm_head shares the embedding

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (what weight-only quantization shrinks)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (d * q + 2 * d * kv + q * d + 3 * d * self.ffn)

    @property
    def other_params(self) -> int:
        """Embedding, lm_head and norms (kept in 16-bit)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


# shared/DESIGN.md: Llama-2 shapes
MODELS = {
    "llama-2-7b": ModelShape(name="llama-2-7b", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128,
                             ffn=11008, vocab=32000),
    "llama-2-13b": ModelShape(name="llama-2-13b", layers=40, hidden=5120, heads=40, kv_heads=40, head_dim=128,
                              ffn=13824, vocab=32000),
    "llama-2-70b": ModelShape(name="llama-2-70b", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                              ffn=28672, vocab=32000),
}


def model_shape(spec: str) -> ModelShape:
    """A known name, or the path of an HF config.json (or of the directory holding it)."""
    if spec in MODELS:
        return MODELS[spec]
    p = Path(spec)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"unknown model {spec!r}; valid: {', '.join(MODELS)}, or the path of an HF config.json")
    c = json.loads(p.read_text())
    heads = c["num_attention_heads"]
    return ModelShape(
        name=c.get("_name_or_path") or p.parent.name, layers=c["num_hidden_layers"], hidden=c["hidden_size"],
        heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, ffn=c["intermediate_size"],
        vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)),
    )


def weight_bytes(m: ModelShape, precision: Precision, group_size: int = 128) -> float:
    """fp16: 2 B/weight; w8a16: 1 B + an fp16 scale per output channel; w4a16: 0.5 B + fp16 scale and
    zero per group. Embedding, lm_head and norms stay fp16."""
    if precision == "fp16":
        linear = 2.0 * m.linear_params
    elif precision == "w8a16":
        rows = m.layers * (m.heads * m.head_dim + 2 * m.kv_heads * m.head_dim + m.hidden * 2 + m.ffn * 2)
        linear = 1.0 * m.linear_params + 2.0 * rows
    elif precision == "w4a16":
        linear = 0.5 * m.linear_params + 4.0 * m.linear_params / group_size
    else:
        raise ConfigError(f"unknown precision {precision!r}; valid: fp16, w8a16, w4a16")
    return linear + 2.0 * m.other_params


def kv_bytes_per_token(m: ModelShape, kv_bytes: int = 2) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes (fp16 cache)."""
    return 2 * m.layers * m.kv_heads * m.head_dim * kv_bytes


def flops_per_token(m: ModelShape, context: int) -> float:
    """~2 x parameters (every weight multiplies once) + attention over the context: QK^T and AV,
    2 x 2 x layers x context x (heads x head_dim)."""
    return 2.0 * (m.params - m.vocab * m.hidden * (0 if m.tied else 1)) + 4.0 * m.layers * context * m.heads * m.head_dim


class ModePlan(BaseModel):
    devices: int
    fits: bool  # weights + KV for one sequence at the context fit in USABLE_FRACTION of memory
    tpot_ms_bound: float  # at 100% of peak bandwidth, batch 1 (or the given batch)
    tpot_ms_expected: tuple[float, float]  # at the MBU range (best, worst)
    comm_ms: float  # collective / hop time inside tpot_ms_bound
    max_batch_at_context: int


class Plan(BaseModel):
    model: str
    device: str
    precision: str
    context: int
    batch: int
    params_b: float  # billions
    weights_gb: float  # 1 GB = 1e9 bytes
    kv_cache_bytes_per_token: int
    kv_cache_gb_per_sequence: float
    min_devices: int  # to hold the weights alone
    max_batch_at_context: int  # on min_devices (tensor-parallel memory pooled)
    flops_per_token: float
    prefill_ms_bound: float  # compute-bound prompt of `context` tokens on one device's peak
    mbu_range: tuple[float, float]
    modes: dict[str, ModePlan]
    device_source: str


def _allreduce_ms(n: int, size_bytes: float, dev: DeviceSpec) -> float:
    """Ring all-reduce: latency + 2(n-1)/n of the message over the link."""
    if n <= 1:
        return 0.0
    return dev.link_latency_us / 1e3 + 2 * (n - 1) / n * size_bytes / (dev.link_gbs * 1e9) * 1e3


def _max_batch(devices: int, weights: float, kv_seq: float, dev: DeviceSpec) -> int:
    free = devices * dev.hbm_gb * 1e9 * USABLE_FRACTION - weights
    return max(0, int(free // kv_seq)) if kv_seq else 0


def plan(model: str, device: str, precision: Precision = "fp16", context: int = 4096, batch: int = 1,
         devices: int | None = None, mbu: tuple[float, float] | None = None, spec: DeviceSpec | None = None) -> Plan:
    """The plan for one model/device/precision; `devices` fixes N for the parallel modes; `spec`: the device's
    figures as given (instead of looking `device` up)."""
    m, dev = model_shape(model), spec or get_device(device)
    lo_eff, hi_eff = mbu or MBU_RANGE
    weights = weight_bytes(m, precision)
    kv_tok = kv_bytes_per_token(m)
    kv_seq = kv_tok * context
    min_dev = max(1, math.ceil(weights / (dev.hbm_gb * 1e9)))
    n = devices or max(min_dev, 2)
    act = batch * m.hidden * 2  # bytes of one token's activations per sequence (fp16)
    bw = dev.bandwidth_gbs * 1e9
    read = weights + batch * kv_seq  # bytes read per decoded token (weights + full KV)

    def mode(devs: int, compute_ms: float, comm_ms: float) -> ModePlan:
        need = weights + batch * kv_seq
        fits = need <= devs * dev.hbm_gb * 1e9 * USABLE_FRACTION
        bound = compute_ms + comm_ms
        return ModePlan(devices=devs, fits=fits, tpot_ms_bound=bound,
                        tpot_ms_expected=(compute_ms / hi_eff + comm_ms, compute_ms / lo_eff + comm_ms),
                        comm_ms=comm_ms, max_batch_at_context=_max_batch(devs, weights, kv_seq, dev))

    single_ms = read / bw * 1e3
    modes = {
        "single": mode(1, single_ms, 0.0),
        # every stage holds 1/n of the layers; a token visits them in turn: same bytes, plus n-1 hops
        "pipeline-parallel": mode(n, single_ms, (n - 1) * (dev.link_latency_us / 1e3 + act / (dev.link_gbs * 1e9) * 1e3)),
        # every device reads 1/n of the weights and KV; two all-reduces per layer (attention out, MLP out)
        "tensor-parallel": mode(n, single_ms / n, 2 * m.layers * _allreduce_ms(n, act, dev)),
    }
    # prompt of `context` tokens: 2 x params per token + causal attention, sum over t of 4 L t H hd = 2 L H hd T^2
    prefill_flops = batch * (flops_per_token(m, 0) * context + 2.0 * m.layers * m.heads * m.head_dim * context**2)
    return Plan(
        model=m.name, device=dev.name, precision=precision, context=context, batch=batch, params_b=m.params / 1e9,
        weights_gb=weights / 1e9, kv_cache_bytes_per_token=kv_tok, kv_cache_gb_per_sequence=kv_seq / 1e9,
        min_devices=min_dev, max_batch_at_context=_max_batch(min_dev, weights, kv_seq, dev),
        flops_per_token=flops_per_token(m, context),
        prefill_ms_bound=prefill_flops / (dev.fp16_tflops * 1e12) * 1e3 if dev.fp16_tflops else float("nan"),
        mbu_range=(lo_eff, hi_eff), modes=modes, device_source=dev.source,
    )


def cheapest(model: str, device: str, tpot_target_ms: float, context: int = 4096, batch: int = 1,
             mbu: tuple[float, float] | None = None) -> dict | None:
    """Fewest devices whose pessimistic expected TPOT meets the target; ties go to the higher precision."""
    options = []
    for rank, precision in enumerate(("fp16", "w8a16", "w4a16")):
        for n in (1, 2, 4, 8, 16):
            p = plan(model, device, precision, context, batch, devices=n, mbu=mbu)
            for name, mp in p.modes.items():
                if (name == "single") != (n == 1) or not mp.fits or mp.tpot_ms_expected[1] > tpot_target_ms:
                    continue
                options.append((n, rank, name, precision, mp))
    if not options:
        return None
    n, _, name, precision, mp = min(options, key=lambda o: (o[0], o[1], o[4].tpot_ms_expected[1]))
    return {"devices": n, "mode": name, "precision": precision, "tpot_ms_expected": mp.tpot_ms_expected}


def plan_layout(model: str, device: str, precision: Precision, tp: int = 1, pp: int = 1, context: int = 4096,
                batch: int = 1, spec: DeviceSpec | None = None) -> dict:
    """Per-device memory of a tp x pp layout as npuflow's ranks load it (runtime/shard_load): each device
    holds 1/tp of its stage's decoder linears and KV heads and 1/pp of the layers; the embedding sits on the
    first stage and lm_head on the last, split by vocabulary rows over the tp ranks when tp divides the
    vocabulary (else whole on each). `fits` within USABLE_FRACTION. `spec`: as in plan."""
    m, dev = model_shape(model), spec or get_device(device)
    if m.heads % tp or m.kv_heads % tp or m.ffn % tp or m.layers % pp:
        raise ConfigError(f"{m.name}: tp = {tp} must divide heads {m.heads}, kv heads {m.kv_heads} and ffn "
                          f"{m.ffn}; pp = {pp} must divide the {m.layers} layers")
    linear_b = weight_bytes(m, precision) - 2 * m.other_params  # other params stay 16-bit
    stage_linear = linear_b / pp / tp
    table = m.vocab * m.hidden * 2 / (tp if m.vocab % tp == 0 else 1)  # one 16-bit embedding or lm_head, bytes
    ends = table * (1 if pp > 1 or m.tied else 2)  # the heaviest stage's replicated tables
    kv = kv_bytes_per_token(m) * context * batch / pp / tp
    per_device = stage_linear + ends + kv + 2 * m.hidden * (2 * m.layers // pp + 1)
    usable = dev.hbm_gb * 1e9 * USABLE_FRACTION
    return {"model": m.name, "device": dev.name, "precision": precision, "tp": tp, "pp": pp, "devices": tp * pp,
            "min_devices": max(1, math.ceil(weight_bytes(m, precision) / (dev.hbm_gb * 1e9))),
            "per_device_weights_gb": (stage_linear + ends) / 1e9, "per_device_kv_gb": kv / 1e9,
            "per_device_gb": per_device / 1e9, "usable_gb": usable / 1e9, "fits": per_device <= usable}
