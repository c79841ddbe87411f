"""Greedy generation through llama.cpp (llama-cpp-python's C API) on a GGUF file, timed like npuflow's engine.

    .venv-llamacpp/bin/python benchmarks/llamacpp_bench.py MODEL.gguf --prompt 1,2,3 --output-len 128 \
        [--threads 2] [--runs 3] [--warmup 1] [--no-extra-bufts] [--out result.json]

Runs in .venv-llamacpp (`make llamacpp`); benchmarks/cpu_runtime.py and the conversion test start it as a
subprocess. Prompts are token ids (no tokenizer involved). One run: clear the KV cache, decode the prompt
as one batch and take the argmax (TTFT, ms), then output_len - 1 single-token decode steps, each timed
from the previous token to this one (TPOT). Greedy = argmax of the last row's logits, as npuflow's engine.
Prints one JSON object: ttft_ms and tpot_ms_p50 per run, the last run's tokens, the weight types and the
bytes read per decoded token (every GGUF tensor but token_embd, plus one of its rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


def weight_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """(bytes read per decoded token, {ggml type: tensor count}) from the GGUF's tensor table."""
    import gguf

    total, types = 0, Counter()
    for t in gguf.GGUFReader(str(path)).tensors:
        types[t.tensor_type.name] += 1
        # a token reads one row of the embedding table: shape is (n_embd, n_vocab) in ggml order
        total += int(t.n_bytes) // int(t.shape[-1]) if t.name == "token_embd.weight" else int(t.n_bytes)
    return total, dict(types)


class Runner:
    """One model and context; `generate` reuses them (the KV cache is cleared per run)."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, threads: int, extra_bufts: bool):
        import llama_cpp

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts  # repacked CPU weight buffers (AVX/AMX layouts) on or off
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise SystemExit(f"llamacpp_bench: llama.cpp could not load {path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SystemExit("llamacpp_bench: llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def _step(self, ids: list[int]) -> int:
        """Decode ids after what the cache holds; the argmax of the last position's logits."""
        arr = (self.ll.llama_token * len(ids))(*ids)
        rc = self.ll.llama_decode(self.ctx, self.ll.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise SystemExit(f"llamacpp_bench: llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompt: list[int], output_len: int) -> tuple[float, list[float], list[int]]:
        """-> (ttft ms, per-token decode ms, output_len greedy tokens)."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        tokens = [self._step(prompt)]
        t = time.perf_counter()
        ttft, steps = (t - t0) * 1e3, []
        for _ in range(output_len - 1):
            tokens.append(self._step([tokens[-1]]))
            now = time.perf_counter()
            steps.append((now - t) * 1e3)
            t = now
        return ttft, steps, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--prompt", required=True, help="comma-separated prompt token ids")
    p.add_argument("--output-len", type=int, default=128, help="greedy tokens per run (the first from prefill)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (prefill and decode)")
    p.add_argument("--runs", type=int, default=1, help="timed runs")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs first")
    p.add_argument("--no-extra-bufts", action="store_true", help="use_extra_bufts=False: no repacked CPU buffers")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args()
    prompt = [int(x) for x in a.prompt.split(",")]
    r = Runner(a.gguf, n_ctx=len(prompt) + a.output_len + 8, n_batch=max(len(prompt), 32), threads=a.threads,
               extra_bufts=not a.no_extra_bufts)
    for _ in range(a.warmup):
        r.generate(prompt, min(a.output_len, 4))
    ttfts, tpots, tokens = [], [], []
    for _ in range(a.runs):
        ttft, steps, tokens = r.generate(prompt, a.output_len)
        ttfts.append(ttft)
        tpots.append(sorted(steps)[len(steps) // 2] if steps else 0.0)
    nbytes, types = weight_bytes(a.gguf)
    result = {"ttft_ms": ttfts, "tpot_ms_p50": tpots, "tokens": tokens, "weight_bytes_per_token": nbytes,
              "tensor_types": types, "extra_bufts": not a.no_extra_bufts,
              "system_info": r.ll.llama_print_system_info().decode()}
    text = json.dumps(result)
    if a.out:
        a.out.write_text(text)
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
