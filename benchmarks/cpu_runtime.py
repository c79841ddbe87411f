"""Benchmark: the npuflow CPU runtime (W8A16) against plain transformers fp32, side by side in one run.

    .venv/bin/python benchmarks/cpu_runtime.py [--threads 2] [--input-len 128] [--output-len 128] [--runs 5]

Model: random-init Llama, hidden 1024, 12 layers, 16 heads, intermediate 2816, vocab 32000 (~220M).
hf-eager: transformers on the unquantized model in fp32 with its default DynamicCache (the baseline).
npuflow:  the same weights quantized w8a16 (embeddings and lm_head float), bf16 activations,
          aten._weight_int8pack_mm for decode, a dequantized bf16 matmul for prefill, a static KV
          cache and the decode step compiled with torch.compile (inductor).
Prints TTFT and TPOT p50 per runtime, decode tokens/s, the ratios, compile time, and whether the
compiled runtime's greedy tokens equal its own eager reference token for token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from npuflow.backends import cpu
from npuflow.config import QuantizationConfig
from npuflow.engine import Engine
from npuflow.quantize import quantize_dir
from npuflow.runtime import load_quantized

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
         "intermediate_size": 2816, "vocab_size": 32000, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


def p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


@torch.inference_mode()
def hf_eager(model, prompt: torch.Tensor, new: int) -> tuple[float, list[float], torch.Tensor]:
    """HF's own loop: DynamicCache, fp32; returns TTFT ms, per-step ms, tokens."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    ttft = (time.perf_counter() - t0) * 1e3
    steps, toks = [], [tok]
    for _ in range(new - 1):
        t = time.perf_counter()
        out = model(tok, cache=out.cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        steps.append((time.perf_counter() - t) * 1e3)
        toks.append(tok)
    return ttft, steps, torch.cat(toks, 1)


def engine_run(engine: Engine, prompt: torch.Tensor, new: int) -> tuple[float, list[float], torch.Tensor]:
    t0 = time.perf_counter()
    tok = engine.prefill(prompt)
    ttft = (time.perf_counter() - t0) * 1e3
    steps, toks = [], [tok]
    for _ in range(new - 1):
        t = time.perf_counter()
        tok = engine.decode(tok)
        steps.append((time.perf_counter() - t) * 1e3)
        toks.append(tok)
    return ttft, steps, torch.cat(toks, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed runs per runtime (after one warm-up)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src, qdir = Path(tmp) / "fp32", Path(tmp) / "w8a16"
        LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])).save_pretrained(src)
        qdir.mkdir()
        quantize_dir(src, qdir, QuantizationConfig())
        baseline = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        fast = load_quantized(qdir, cpu, torch.bfloat16)
        prompt = torch.randint(0, SHAPE["vocab_size"], (1, a.input_len), generator=torch.Generator().manual_seed(1))
        max_len = a.input_len + a.output_len + 8

        eager_engine = Engine(fast, max_len, compile=False)
        reference = engine_run(eager_engine, prompt, a.output_len)[2]
        t = time.perf_counter()
        engine = Engine(fast, max_len, compile=True)
        engine_run(engine, prompt, 4)  # compiles the decode step
        compile_s = time.perf_counter() - t

        results: dict[str, dict[str, list[float]]] = {"hf-eager": {"ttft": [], "tpot": []},
                                                       "npuflow": {"ttft": [], "tpot": []}}
        tokens = None
        hf_eager(baseline, prompt, 4)  # warm-up
        engine_run(engine, prompt, 4)
        for _ in range(a.runs):  # interleaved, so both see the same machine conditions
            ttft, steps, _ = hf_eager(baseline, prompt, a.output_len)
            results["hf-eager"]["ttft"].append(ttft)
            results["hf-eager"]["tpot"].append(p50(steps))
            ttft, steps, tokens = engine_run(engine, prompt, a.output_len)
            results["npuflow"]["ttft"].append(ttft)
            results["npuflow"]["tpot"].append(p50(steps))

    print(f"threads {a.threads}, input {a.input_len}, output {a.output_len}, {a.runs} interleaved runs each")
    print(f"{'runtime':10} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'decode tok/s':>13}")
    summary = {}
    for name, r in results.items():
        ttft, tpot = p50(r["ttft"]), p50(r["tpot"])
        summary[name] = (ttft, tpot)
        print(f"{name:10} {ttft:12.1f} {tpot:12.2f} {1e3 / tpot:13.1f}")
    (b_ttft, b_tpot), (f_ttft, f_tpot) = summary["hf-eager"], summary["npuflow"]
    print(f"decode speed-up   {b_tpot / f_tpot:.2f}x   (target >= 2.5x)  {'OK' if b_tpot / f_tpot >= 2.5 else 'MISSED'}")
    print(f"TTFT ratio        {f_ttft / b_ttft:.2f}    (target <= 1.0)   {'OK' if f_ttft <= b_ttft else 'MISSED'}")
    print(f"compile time      {compile_s:.1f} s")
    same = tokens is not None and torch.equal(tokens, reference)
    print(f"greedy tokens of the compiled runtime == its eager reference: {same}")


if __name__ == "__main__":
    main()
