"""npuflow serve vs vLLM CPU on the same W4A16 weights, the same load, side by side in one run.

The 220M benchmark Llama (hidden 1024, 12 layers, 16 heads, intermediate 2816, vocab 32000, random
weights, a word-level tokenizer of 32000 words) is quantized once by `npuflow quantize --scheme w4a16
--group-size 128 --format compressed-tensors`; both servers load that directory. The load is vLLM's own
`vllm bench serve` (random prompts of --input-len tokens, --output-len tokens each with ignore_eos, greedy, the
OpenAI completions API, streaming), run from the vLLM environment against each server in turn,
interleaved per concurrency, both servers up throughout.

    make vllm    # once: the vLLM environment in .venv-vllm
    .venv/bin/python benchmarks/serving.py [--concurrency 1 16] [--rounds 2]

Prints output tokens per second of wall time (prefill included), request throughput, TTFT/TPOT/ITL
p50/p99 per server and concurrency, and the npuflow/vLLM ratios. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from npuflow.bench.load import (  # the load tool and the server start/stop that the benchmark stage uses
    BENCH_SERVE,
    start_server,
    stop_server,
)

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
SHAPE = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
         "intermediate_size": 2816, "vocab_size": 32000, "max_position_embeddings": 2048}
NAME = "m220"


def build_source(work: Path) -> Path:
    """The random 220M Llama (bf16, seed 0) with a 32000-word tokenizer, in HF format under work/src."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    src = work / "src"
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
                         ).to(torch.bfloat16).save_pretrained(src)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SHAPE["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=SHAPE["max_position_embeddings"]).save_pretrained(src)
    return src


def build_model(work: Path) -> Path:
    """build_source's model quantized W4A16 g128 compressed-tensors (what vLLM CPU serves)."""
    out = work / "w4a16-ct"
    if (out / "quant_manifest.json").is_file():
        return out
    src = build_source(work)
    subprocess.run([str(ROOT / ".venv/bin/npuflow"), "quantize", str(src), "--output", str(out), "--scheme", "w4a16",
                    "--group-size", "128", "--format", "compressed-tensors"], check=True)
    return out


def bench(port: int, model_dir: Path, concurrency: int, prompts: int, a, out: Path) -> dict:
    cmd = [str(VLLM_PY), "-c", BENCH_SERVE, "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--model", NAME, "--tokenizer", str(model_dir),
           "--dataset-name", "random", "--random-input-len", str(a.input_len), "--random-output-len",
           str(a.output_len), "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--seed", "0",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions per concurrency")
    p.add_argument("--work", type=Path, default=ROOT / ".npuflow" / "bench-serving")
    a = p.parse_args()
    if not VLLM_PY.is_file():
        raise SystemExit("the vLLM environment is not installed: run `make vllm` first")
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(a.work)
    threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    servers = {
        "npuflow": ([str(ROOT / ".venv/bin/npuflow"), "serve", "--model", str(model_dir), "--name", NAME,
                     "--port", "18101", "--max-batch", "16", "--max-tokens", "1024"], 18101, threads),
        "vllm": ([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                  "--served-model-name", NAME, "--host", "127.0.0.1", "--port", "18102", "--max-model-len", "2048",
                  "--dtype", "bfloat16", "--max-num-seqs", "16"], 18102,
                 {**threads, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}),
    }
    procs = {}
    try:
        for name, (cmd, port, env) in servers.items():
            t = time.perf_counter()
            procs[name] = start_server(cmd, port, a.work / f"{name}.log", 600, extra_env=env)
            print(f"{name}: healthy after {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rows: dict[tuple[str, int], list[dict]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for c in a.concurrency:
                prompts = max(8, 2 * c)
                for name, _ in servers.items():  # a warm-up pass each (compilation, caches)
                    bench(servers[name][1], model_dir, c, c, a, Path(tmp) / "warm.json")
                for r in range(a.rounds):
                    for name in servers:
                        res = bench(servers[name][1], model_dir, c, prompts, a, Path(tmp) / f"{name}-{c}-{r}.json")
                        rows.setdefault((name, c), []).append(res)
        report(rows, a)
    finally:
        for proc in procs.values():
            stop_server(proc)


def report(rows: dict[tuple[str, int], list[dict]], a) -> None:
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    print(f"\nserving, 220M Llama W4A16 g128 (compressed-tensors), input {a.input_len}, output {a.output_len} "
          "(ignore_eos, greedy), vllm bench serve, interleaved; medians of rounds")
    print(f"{'server':8} {'conc':>4} {'out tok/s':>9} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}")
    summary = {}
    for (name, c), results in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = {k: med([r[k] for r in results]) for k in ("output_throughput", "request_throughput", "p50_ttft_ms",
                                                      "p99_ttft_ms", "p50_tpot_ms", "p50_itl_ms", "p99_itl_ms")}
        summary[(name, c)] = m
        print(f"{name:8} {c:>4} {m['output_throughput']:>9.1f} {m['request_throughput']:>6.2f} {m['p50_ttft_ms']:>9.1f} "
              f"{m['p99_ttft_ms']:>9.1f} {m['p50_tpot_ms']:>9.2f} {m['p50_itl_ms']:>8.2f} {m['p99_itl_ms']:>8.2f}")
    for c in a.concurrency:
        if ("npuflow", c) in summary and ("vllm", c) in summary:
            ratio = summary[("npuflow", c)]["output_throughput"] / summary[("vllm", c)]["output_throughput"]
            print(f"concurrency {c}: npuflow / vLLM output tok/s = {ratio:.2f}x")


if __name__ == "__main__":
    main()
