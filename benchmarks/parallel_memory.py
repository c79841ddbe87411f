"""Benchmark: peak host memory per rank when tp / pp ranks read only their part of a W8A16 ~1B Llama.

Generates the ~1.03B-parameter fp16 checkpoint of benchmarks/quantize_streaming.py (random weights, 256 MB
shards), quantizes it to W8A16 (native format), then measures the peak RSS (ru_maxrss) of:
  single: one process, load_quantized + 8 greedy tokens through the engine;
  tp2 / pp2: every rank of `launch_task("generate", ...)` (torchrun, gloo), rank-local loading + 8 tokens.
Target (issue 15): each TP=2 rank's peak <= 0.6 x the single-device peak.

    .venv/bin/python benchmarks/parallel_memory.py [--workdir DIR] [--dtype bfloat16] [--keep] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SINGLE = """
import json, sys, torch
from pathlib import Path
from npuflow.runtime.backends import cpu
from npuflow.runtime.engine import Engine
from npuflow.runtime.loader import DTYPES, load_quantized
from npuflow.runtime.pipeline import peak_rss_mb
from npuflow.runtime.scheduler import generate
model = load_quantized(Path(sys.argv[1]), cpu, DTYPES[sys.argv[2]])
prompt = torch.tensor(json.loads(sys.argv[3]))
with torch.inference_mode():
    tokens = generate(Engine(model, max_len=prompt.shape[1] + 8), prompt, 8).tolist()
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "greedy_tokens": tokens}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--model", type=Path, default=None, help="a W8A16 checkpoint kept by --keep: skip generating")
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quantize_streaming import generate, write_tokenizer

    from npuflow.core.config import QuantizationConfig
    from npuflow.quant.streaming import quantize_dir
    from npuflow.runtime.pipeline import launch_task

    work = Path(tempfile.mkdtemp(prefix="npuflow-ppmem-", dir=a.workdir))
    try:
        src, q = work / "fp16", a.model or work / "w8a16"
        t0 = time.perf_counter()
        if a.model is None:
            generate(src, 256 * 10**6)
            write_tokenizer(src)
            q.mkdir()
            quantize_dir(src, q, QuantizationConfig(scheme="w8a16"))
        size = sum(f.stat().st_size for f in q.glob("*.safetensors")) / 2**20
        print(f"W8A16 checkpoint: {size:.0f} MiB in {time.perf_counter() - t0:.0f} s", flush=True)
        prompt = [[1 + (7 * i) % 500 for i in range(32)]]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run([sys.executable, "-c", SINGLE, str(q), a.dtype, json.dumps(prompt)], env=env,
                              capture_output=True, text=True, check=True)
        single = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"single device: peak RSS {single['peak_rss_mb']:.0f} MiB", flush=True)
        for tp, pp in ((2, 1), (1, 2)):
            got = launch_task("generate", q, "cpu", a.dtype, tp, pp, {"prompts": prompt, "max_new_tokens": 8},
                              timeout_s=1800)
            same = got["greedy_tokens"] == single["greedy_tokens"]
            for r in got["ranks"]:
                print(f"tp={tp} pp={pp} rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MiB = "
                      f"{r['peak_rss_mb'] / single['peak_rss_mb']:.2f} x single; greedy tokens equal: {same}",
                      flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
