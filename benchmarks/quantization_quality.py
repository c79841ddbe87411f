"""Quality of each quantization scheme and method on the demo model, against its float reference.

    .venv/bin/python benchmarks/quantization_quality.py [--model DIR | --size small] [--max-tokens 8192]

Builds the demo model (tiny Llama, ~30 s; --size small: the larger one, 6.6M params, 8 layers, trained
--steps on the same corpus, several minutes) unless --model is given, quantizes it with every scheme and
method, and prints perplexity (reference and candidate), its change, top-1 agreement and KL divergence
on the held-out evaluation text, with the time each quantization took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from npuflow.core.config import WEIGHT_ONLY, QuantizationConfig
from npuflow.core.text import make_windows
from npuflow.demo.tinymodel import build_tiny_llama, eval_text
from npuflow.eval.quality import compare
from npuflow.quant.model import quantize_model
from npuflow.runtime.backends import cpu
from npuflow.runtime.loader import load_quantized, load_reference, load_tokenizer

# (scheme, group size, method, SmoothQuant alpha: w8a8 schemes only, None there means no smoothing)
RUNS = [("w8a16", None, "rtn", None), ("w8a16", None, "gptq", None), ("w4a16", 128, "rtn", None),
        ("w4a16", 128, "gptq", None), ("w4a16", 32, "rtn", None), ("w4a16", 32, "gptq", None),
        ("w8a8", None, "rtn", 0.5), ("w8a8", None, "rtn", None),
        ("w8a8-dynamic", None, "rtn", 0.5), ("w8a8-dynamic", None, "rtn", None)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="an HF Llama directory (default: build the demo model)")
    p.add_argument("--size", default="demo", choices=("demo", "small"), help="the trained model to build")
    p.add_argument("--steps", type=int, default=300, help="training steps of the built model")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--schemes", default="", help="comma-separated schemes to run (default: all)")
    a = p.parse_args()
    runs = [r for r in RUNS if not a.schemes or r[0] in a.schemes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = a.model or build_tiny_llama(work / "tiny-llama", size=a.size, steps=a.steps, progress=True)
        tok = load_tokenizer(src)
        tok.model_max_length = 1 << 62
        windows = make_windows(tok(eval_text())["input_ids"], 128, a.max_tokens)
        ref = load_reference(src, torch.device("cpu"))
        print(f"{'scheme':12} {'group':>5} {'method':6} {'alpha':>5} {'lm_head':>7} {'ppl ref':>9} {'ppl cand':>9} {'delta %':>9} {'top-1':>7} "
              f"{'KL':>9} {'seconds':>8}")
        heads = [(*r, head) for r in runs for head in (("quant", "float") if r[0] in WEIGHT_ONLY else ("float",))]
        for scheme, group, method, alpha, head in heads:
            out = work / f"{scheme}-{group}-{method}-{alpha}-{head}"
            out.mkdir()
            t = time.perf_counter()
            # the native format's default quantizes lm_head for the weight-only schemes (int8 per channel)
            ignore = {"ignore": ("model.embed_tokens", "lm_head")} if head == "float" else {}
            quantize_model(src, out, QuantizationConfig(scheme=scheme, group_size=group, method=method,
                                                        sensitivity=False, smoothquant_alpha=alpha, **ignore))
            secs = time.perf_counter() - t
            model = load_quantized(out, cpu, torch.float32)
            bits = f"int{model.lm_head.bits}" if head == "quant" else "float"
            m = compare(ref, model, windows, 8, torch.device("cpu"))
            smooth = "-" if alpha is None else f"{alpha:g}"
            print(f"{scheme:12} {group or '-':>5} {method:6} {smooth:>5} {bits:>7} {m['ppl_reference']:9.5f} {m['ppl_candidate']:9.5f} "
                  f"{m['ppl_delta_pct']:+9.4f} {m['top1_agreement']:7.4f} {m['kl_divergence']:9.2e} {secs:8.1f}")


if __name__ == "__main__":
    main()
