"""Benchmark: the npuflow CPU runtime (W8A16) against plain transformers fp32, side by side in one run.

    .venv/bin/python benchmarks/cpu_runtime.py [--threads 2] [--input-len 128] [--output-len 128] [--runs 5] [--cli]

Model: random-init Llama, hidden 1024, 12 layers, 16 heads, intermediate 2816, vocab 32000 (~220M).
hf-eager: transformers on the unquantized model in fp32 with its default DynamicCache (the baseline).
npuflow:  the same weights quantized w8a16 (embeddings and lm_head float), bf16 activations,
          aten._weight_int8pack_mm for decode, a dequantized bf16 matmul for prefill, a static KV
          cache and the decode step compiled with torch.compile (inductor): npuflow.bench.measure.EngineLoop,
          what `npuflow benchmark --runtime npuflow` times.
npuflow-w4: the same with w4a16 group 128 on aten._weight_int4pack_mm_for_cpu.
Prints TTFT and TPOT p50 per runtime, decode tokens/s, the ratios, compile time, and whether the
compiled runtime's greedy tokens equal its own eager reference token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from npuflow.bench.measure import EngineLoop, HFBaseline
from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.loader import load_quantized

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
         "intermediate_size": 2816, "vocab_size": 32000, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


def p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


@torch.inference_mode()
def divergence(model, prompt: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor) -> str:
    """Where two greedy continuations part, and how close the eager logits' top two were there."""
    k = int((reference[0] != tokens[0]).nonzero()[0])
    logits = model(torch.cat([prompt, reference[:, :k]], dim=1)).logits[0, -1].float()
    top = logits.topk(2).values
    return f"first differs at token {k}; eager top-2 logit margin there {float(top[0] - top[1]):.4f}"


def through_the_cli(src: Path, qdir: Path, a: argparse.Namespace) -> None:
    """The same comparison as users run it: `npuflow benchmark --runtime hf-eager|npuflow`, each in its own
    process, alternated A B A B; figures read back from the JSON files."""
    common = ["--device", "cpu", "--batch-size", "1", "--input-len", str(a.input_len), "--output-len",
              str(a.output_len), "--warmup", "1", "--iterations", str(a.runs)]
    rows: dict[str, list[dict]] = {"hf-eager": [], "npuflow": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            for runtime, model in (("hf-eager", src), ("npuflow", qdir)):
                out = Path(tmp) / f"{runtime}-{i}.json"
                cmd = [sys.executable, "-m", "npuflow.cli", "benchmark", str(model), "--runtime", runtime, *common,
                       "--output", str(out)]
                subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1],
                               env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
                rows[runtime].append(json.loads(out.read_text()))
    print(f"\nthrough the CLI (npuflow benchmark --runtime ..., {a.runs} iterations, 2 alternated runs each):")
    print(f"{'runtime':10} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'decode tok/s':>13} {'peak MB':>8}")
    for runs in rows.values():
        for r in runs:
            print(f"{r['runtime']:10.10} {r['ttft_ms_p50']:12.1f} {r['tpot_ms_p50']:12.2f} "
                  f"{r['decode_tokens_per_s']:13.1f} {r['peak_memory_mb']:8.0f}")
    b = sorted(r["tpot_ms_p50"] for r in rows["hf-eager"])[0]
    f = sorted(r["tpot_ms_p50"] for r in rows["npuflow"])[0]
    bt = sorted(r["ttft_ms_p50"] for r in rows["hf-eager"])[0]
    ft = sorted(r["ttft_ms_p50"] for r in rows["npuflow"])[0]
    print(f"CLI decode speed-up (best of 2 each) {b / f:.2f}x, TTFT ratio {ft / bt:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed runs per runtime (after one warm-up)")
    p.add_argument("--cli", action="store_true", help="also compare through `npuflow benchmark --runtime`")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src, qdir, q4dir = Path(tmp) / "fp32", Path(tmp) / "w8a16", Path(tmp) / "w4a16"
        LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])).save_pretrained(src)
        qdir.mkdir()
        quantize_dir(src, qdir, QuantizationConfig())
        q4dir.mkdir()
        quantize_dir(src, q4dir, QuantizationConfig(scheme="w4a16", group_size=128))
        fast4 = load_quantized(q4dir, cpu, torch.bfloat16)  # aten._weight_int4pack_mm_for_cpu
        baseline = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        fast = load_quantized(qdir, cpu, torch.bfloat16)  # the CPU backend's default where bf16 is native
        prompt = torch.randint(0, SHAPE["vocab_size"], (1, a.input_len), generator=torch.Generator().manual_seed(1))

        reference = EngineLoop(fast, cpu, compile=False)(prompt, a.output_len)[3]
        runtimes = {"hf-eager": HFBaseline(baseline, cpu), "npuflow": EngineLoop(fast, cpu, compile=True),
                    "npuflow-w4": EngineLoop(fast4, cpu, compile=True)}
        for gen in runtimes.values():
            gen(prompt, 4)  # warm-up (the engine compiles its decode step here)
        compile_s = next(iter(runtimes["npuflow"].first_run_s.values()))
        results = {name: {"ttft": [], "tpot": []} for name in runtimes}
        tokens = {}
        for _ in range(a.runs):  # interleaved, so every runtime sees the same machine conditions
            for name, gen in runtimes.items():
                ttft, steps, _, tokens[name] = gen(prompt, a.output_len)
                results[name]["ttft"].append(ttft)
                results[name]["tpot"].append(p50(steps))
        same = torch.equal(tokens["npuflow"], reference)
        why = "" if same else " (" + divergence(fast, prompt, reference, tokens["npuflow"]) + ")"
        del runtimes, baseline, fast, fast4
        if a.cli:
            through_the_cli(src, qdir, a)

    print(f"threads {a.threads}, input {a.input_len}, output {a.output_len}, {a.runs} interleaved runs each")
    print(f"{'runtime':10} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'decode tok/s':>13}")
    summary = {}
    for name, r in results.items():
        ttft, tpot = p50(r["ttft"]), p50(r["tpot"])
        summary[name] = (ttft, tpot)
        print(f"{name:10} {ttft:12.1f} {tpot:12.2f} {1e3 / tpot:13.1f}")
    (b_ttft, b_tpot), (f_ttft, f_tpot) = summary["hf-eager"], summary["npuflow"]
    print(f"w4a16 g128 (int4 packed kernel): decode {b_tpot / summary['npuflow-w4'][1]:.2f}x hf-eager")
    print("w8a16 (the acceptance line):")
    print(f"decode speed-up   {b_tpot / f_tpot:.2f}x   (target >= 2.5x)  {'OK' if b_tpot / f_tpot >= 2.5 else 'MISSED'}")
    print(f"TTFT ratio        {f_ttft / b_ttft:.2f}    (target <= 1.0)   {'OK' if f_ttft <= b_ttft else 'MISSED'}")
    print(f"compile time      {compile_s:.1f} s (first engine run: trace + inductor)")
    print(f"greedy tokens of the compiled runtime == its eager reference: {same}{why}")


if __name__ == "__main__":
    main()
