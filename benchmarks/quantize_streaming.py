"""Benchmark: `npuflow quantize` (the CLI users run) on a generated ~1B-parameter fp16 Llama in <= 256 MB shards.

Prints input MB/s and the CLI process's peak RSS against the target
(peak RSS <= 2 x largest shard + 1 GiB of process baseline; >= 150 MB/s of input on 2 cores).

    .venv/bin/python benchmarks/quantize_streaming.py [--workdir DIR] [--scheme w8a16] [--keep] [-- CLI OPTIONS]

The checkpoint is written tensor by tensor (never a whole model in memory) with random weights and a
small byte-level BPE tokenizer (tokenizer.json), as a hub checkpoint ships one. The command is
`npuflow quantize file://CKPT --scheme S --output OUT` with the defaults users get (start-up, the
checks, reading the checkpoint in place, quantization and the atomic publish all timed, in a fresh
NPUFLOW_HOME); peak RSS is the child's ru_maxrss (RUSAGE_CHILDREN: the only child this process waits
for). Options after `--` go to the CLI as they are: `-- --sensitivity` times the sensitivity report
(calibration text: a generated JSON-lines file unless --calibration is given too).
"""

from __future__ import annotations

import argparse
import json
import os
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


def write_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(500)],
                            trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out_dir)


def run_cli(src: Path, out: Path, home: Path, scheme: str, extra: list[str]) -> tuple[float, float, float]:
    """Run `npuflow quantize` as users do; returns (wall seconds, peak RSS MiB, CPU seconds user + system)."""
    exe = Path(sys.executable).with_name("npuflow")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "npuflow.cli"]
    cmd += ["quantize", src.as_uri(), "--scheme", scheme, "--output", str(out), *extra]
    env = {**os.environ, "NPUFLOW_HOME": str(home)}
    env.pop("NPUFLOW_STORE_URI", None)
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 1024  # KiB -> MiB, the largest child
    if proc.returncode:
        sys.exit(f"npuflow quantize failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return secs, peak, usage.ru_utime + usage.ru_stime


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--scheme", default="w8a16", choices=["w8a16", "w4a16"])
    p.add_argument("--shard-mb", type=int, default=256, help="largest shard, MB (1e6 bytes)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--sha256sums", action="store_true",
                   help="ship a SHA256SUMS with the checkpoint (the CLI then verifies every file first)")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    work = Path(tempfile.mkdtemp(prefix="npuflow-qbench-", dir=a.workdir))
    try:
        src, out = work / "fp16", work / "out"
        t0 = time.perf_counter()
        total, largest = generate(src, a.shard_mb * 10**6)
        write_tokenizer(src)
        if a.sha256sums:
            from npuflow.core.artifacts import sha256_file

            (src / "SHA256SUMS").write_text("".join(f"{sha256_file(f)}  {f.name}\n" for f in sorted(src.iterdir())))
        print(f"generated {sum(1 for _ in src.glob('*.safetensors'))} shards, {total / 1e6:.0f} MB "
              f"(largest {largest / 1e6:.0f} MB) + tokenizer in {time.perf_counter() - t0:.1f} s")
        if "--sensitivity" in extra and "--calibration" not in extra:  # a random model: any real-looking text
            cal = work / "calibration.jsonl"
            cal.write_text("".join(json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog "
                                                       f"{i * 13} times, line after line."}) + "\n" for i in range(3000)))
            extra += ["--calibration", cal.as_uri()]
        secs, peak, cpu = run_cli(src, out, work / "home", a.scheme, extra)
        mbps = total / 1e6 / secs
        limit = 2 * largest / 2**20 + 1024
        out_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
        print(f"scheme            {a.scheme} {' '.join(extra)}{' (SHA256SUMS verified)' if a.sha256sums else ''}")
        print(f"input             {total / 1e6:.0f} MB -> output {out_mb:.0f} MB"
              f"{' + sensitivity.json' if (out / 'sensitivity.json').is_file() else ''}")
        print(f"time              {secs:.1f} s wall (the whole CLI: start, checks, quantize, publish), "
              f"{cpu:.1f} s CPU (user + system)")
        print(f"throughput        {mbps:.0f} MB/s of input   (target >= 150)   {'OK' if mbps >= 150 else 'MISSED'}")
        print(f"peak RSS          {peak:.0f} MiB")
        print(f"RSS limit         {limit:.0f} MiB = 2 x largest shard + 1 GiB   {'OK' if peak <= limit else 'MISSED'}")
        print(f"load average      {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
