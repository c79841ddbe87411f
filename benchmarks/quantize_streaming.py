"""Benchmark: streaming quantization of a generated ~1B-parameter fp16 Llama in <= 256 MB shards.

Prints input MB/s and the quantizing process's peak RSS against the target
(peak RSS <= 2 x largest shard + 1 GiB of process baseline; >= 150 MB/s of input on 2 cores).

    .venv/bin/python benchmarks/quantize_streaming.py [--workdir DIR] [--scheme w8a16] [--keep]

The checkpoint is written tensor by tensor (never a whole model in memory) with random weights; the
quantization runs in a child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ~1.03B parameters: 20 layers, d 2048, ffn 5632, GQA 32 heads / 8 KV heads, vocab 32000
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 20, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
    "tie_word_embeddings": False,
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, ffn, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (d,)), (f"{p}.self_attn.q_proj.weight", (d, d)),
            (f"{p}.self_attn.k_proj.weight", (kv, d)), (f"{p}.self_attn.v_proj.weight", (kv, d)),
            (f"{p}.self_attn.o_proj.weight", (d, d)), (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.mlp.gate_proj.weight", (ffn, d)), (f"{p}.mlp.up_proj.weight", (ffn, d)),
            (f"{p}.mlp.down_proj.weight", (d, ffn)),
        ]
    return [*out, ("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def generate(out_dir: Path, shard_bytes: int) -> tuple[int, int]:
    """Write the checkpoint shard by shard; returns (total bytes, largest shard bytes)."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2))
    gen = torch.Generator().manual_seed(0)
    size = 0
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for name, shape in tensor_shapes(CONFIG):  # plan shards by size first
        n = 2 * int(torch.Size(shape).numel())  # fp16 bytes
        if size + n > shard_bytes and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += n
    weight_map, total, largest = {}, 0, 0
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, shape in names:  # norms are ones, matrices N(0, 0.02^2) as at initialisation
            shard[name] = (torch.ones(shape, dtype=torch.float16) if len(shape) == 1 else
                           torch.randn(shape, generator=gen).mul_(0.02).to(torch.float16))
            weight_map[name] = fname
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        del shard
        b = (out_dir / fname).stat().st_size
        total, largest = total + b, max(largest, b)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, largest


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM, MiB); unlike ru_maxrss it is not inherited across fork/exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(src: str, out: str, scheme: str) -> None:
    """Run in a fresh process: quantize, then print seconds and peak RSS as JSON."""
    from npuflow.core.config import QuantizationConfig
    from npuflow.quant.streaming import quantize_dir

    base = vm_hwm_mb()  # after imports: the process baseline
    t0 = time.perf_counter()
    quantize_dir(Path(src), Path(out), QuantizationConfig(scheme=scheme))
    secs = time.perf_counter() - t0
    peak = vm_hwm_mb()
    print(json.dumps({"seconds": secs, "peak_rss_mb": peak, "baseline_rss_mb": base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--scheme", default="w8a16", choices=["w8a16", "w4a16"])
    p.add_argument("--shard-mb", type=int, default=256, help="largest shard, MB (1e6 bytes)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="npuflow-qbench-", dir=a.workdir))
    try:
        src, out = work / "fp16", work / "out"
        t0 = time.perf_counter()
        total, largest = generate(src, a.shard_mb * 10**6)
        print(f"generated {sum(1 for _ in src.glob('*.safetensors'))} shards, {total / 1e6:.0f} MB "
              f"(largest {largest / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        out.mkdir()
        proc = subprocess.run([sys.executable, __file__, "--child-run", str(src), str(out), a.scheme],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = r["baseline_rss_mb"]
        mbps = total / 1e6 / r["seconds"]
        limit = 2 * largest / 2**20 + 1024
        out_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
        print(f"scheme            {a.scheme}")
        print(f"input             {total / 1e6:.0f} MB -> output {out_mb:.0f} MB")
        print(f"time              {r['seconds']:.1f} s")
        print(f"throughput        {mbps:.0f} MB/s of input   (target >= 150)   {'OK' if mbps >= 150 else 'MISSED'}")
        print(f"peak RSS          {r['peak_rss_mb']:.0f} MiB (process baseline {base:.0f} MiB)")
        print(f"RSS limit         {limit:.0f} MiB = 2 x largest shard + 1 GiB   "
              f"{'OK' if r['peak_rss_mb'] <= limit else 'MISSED'}")
        print(f"RSS above baseline {r['peak_rss_mb'] - base:.0f} MiB = {(r['peak_rss_mb'] - base) / (largest / 2**20):.2f} x "
              "largest shard")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child-run":
        child(*sys.argv[2:])
    else:
        main()
