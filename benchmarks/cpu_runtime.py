"""Benchmark: the npuflow CPU runtime (W8A16) against plain transformers fp32, side by side in one run.

    .venv/bin/python benchmarks/cpu_runtime.py [--threads 2] [--input-len 128] [--output-len 128] [--runs 5] [--cli]

Model: random-init Llama, hidden 1024, 12 layers, 16 heads, intermediate 2816, vocab 32000 (~220M).
hf-eager: transformers on the unquantized model in fp32 with its default DynamicCache (the baseline).
npuflow:  the same weights quantized w8a16 (embeddings and lm_head float), bf16 activations,
          aten._weight_int8pack_mm for decode, a dequantized bf16 matmul for prefill, a static KV
          cache and the decode step compiled with torch.compile (inductor): npuflow.bench.measure.EngineLoop,
          what `npuflow benchmark --runtime npuflow` times.
npuflow-w4: the same with w4a16 group 128 on aten._weight_int4pack_mm_for_cpu.
llama.cpp: when .venv-llamacpp exists (`make llamacpp`), the same fp32 weights written as GGUF (F16, then
          llama.cpp's own quantizer to Q8_0 and Q4_0: benchmarks/gguf_export.py) and run by llama.cpp with
          n_threads = --threads, each run in its own process (benchmarks/llamacpp_bench.py), interleaved with
          the npuflow runs; same prompt token ids, greedy, fixed output length.
Prints TTFT and TPOT p50 per runtime, decode tokens/s, the ratios, compile time, whether the compiled
runtime's greedy tokens equal its own eager reference token for token, the measured read bandwidth for the
threads in use and MBU per runtime = weight bytes read per decoded token / TPOT / that bandwidth.
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

from npuflow.bench.devices import measure_cpu_bandwidth_gbs
from npuflow.bench.measure import EngineLoop, HFBaseline
from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.loader import load_quantized

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 16,
         "intermediate_size": 2816, "vocab_size": 32000, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


REPO = Path(__file__).resolve().parents[1]
LLAMACPP_VENV = REPO / ".venv-llamacpp"
LLAMACPP_TYPES = ("q8_0", "q4_0")


def p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def llamacpp_ready() -> bool:
    """The llama.cpp venv is complete (install.sh writes its stamp last)."""
    return any(LLAMACPP_VENV.glob(".npuflow-llamacpp-*"))


def export_ggufs(src: Path, out_dir: Path, threads: int) -> dict[str, Path]:
    """The fp32 checkpoint as Q8_0 and Q4_0 GGUF files (F16 first, then llama.cpp's quantizer)."""
    out = {}
    for t in LLAMACPP_TYPES:
        out[t] = out_dir / f"model-{t}.gguf"
        cmd = [str(LLAMACPP_VENV / "bin" / "python"), str(REPO / "benchmarks" / "gguf_export.py"), str(src),
               str(out[t]), "--type", t, "--threads", str(threads)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


class LlamaCpp:
    """One llama.cpp run per call, in its own process: a warm-up generation, then one timed one. If it dies
    with the repacked CPU buffers on (use_extra_bufts), the type is run with them off from then on."""

    def __init__(self, gguf: Path, prompt: torch.Tensor, a: argparse.Namespace):
        self.gguf, self.a = gguf, a
        self.prompt = ",".join(map(str, prompt[0].tolist()))
        self.extra_bufts, self.note = True, ""

    def _run(self) -> subprocess.CompletedProcess:
        cmd = [str(LLAMACPP_VENV / "bin" / "python"), str(REPO / "benchmarks" / "llamacpp_bench.py"), str(self.gguf),
               "--prompt", self.prompt, "--output-len", str(self.a.output_len), "--threads", str(self.a.threads),
               "--runs", "1", "--warmup", "1", *([] if self.extra_bufts else ["--no-extra-bufts"])]
        return subprocess.run(cmd, capture_output=True, text=True)

    def __call__(self) -> dict:
        r = self._run()
        if r.returncode != 0 and self.extra_bufts:
            self.extra_bufts = False
            self.note = f"crashed with use_extra_bufts=True (exit {r.returncode}); run with use_extra_bufts=False"
            r = self._run()
        if r.returncode != 0:
            raise SystemExit(f"llama.cpp run failed (exit {r.returncode}): {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def npuflow_bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decoded token reads: every parameter and buffer (int8/int4 weights, scales, norms, the
    lm_head) except the embedding table, of which one row; shared storage counted once."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        total += nbytes // t.shape[0] if "embed_tokens" in name else nbytes
    return total


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


def run_all(a: argparse.Namespace, tmp: Path) -> dict:
    """Build the 220M model, quantize it, export the GGUF files, then time every runtime, interleaved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src, qdir, q4dir = tmp / "fp32", tmp / "w8a16", tmp / "w4a16"
    LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])).save_pretrained(src)
    qdir.mkdir()
    quantize_dir(src, qdir, QuantizationConfig())
    q4dir.mkdir()
    quantize_dir(src, q4dir, QuantizationConfig(scheme="w4a16", group_size=128))
    ggufs = export_ggufs(src, tmp, a.threads) if llamacpp_ready() else {}
    fast4 = load_quantized(q4dir, cpu, torch.bfloat16)  # aten._weight_int4pack_mm_for_cpu
    baseline = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fast = load_quantized(qdir, cpu, torch.bfloat16)  # the CPU backend's default where bf16 is native
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, a.input_len), generator=torch.Generator().manual_seed(1))

    reference = EngineLoop(fast, cpu, compile=False)(prompt, a.output_len)[3]
    runtimes = {"hf-eager": HFBaseline(baseline, cpu), "npuflow": EngineLoop(fast, cpu, compile=True),
                "npuflow-w4": EngineLoop(fast4, cpu, compile=True)}
    llama = {f"llama.cpp-{t}": LlamaCpp(path, prompt, a) for t, path in ggufs.items()}
    nbytes = {"hf-eager": npuflow_bytes_per_token(baseline), "npuflow": npuflow_bytes_per_token(fast),
              "npuflow-w4": npuflow_bytes_per_token(fast4)}
    for gen in runtimes.values():
        gen(prompt, 4)  # warm-up (the engine compiles its decode step here)
    compile_s = next(iter(runtimes["npuflow"].first_run_s.values()))
    results = {name: {"ttft": [], "tpot": []} for name in [*runtimes, *llama]}
    tokens, types = {}, {}
    for _ in range(a.runs):  # interleaved (A B A B), so every runtime sees the same machine conditions
        for name, gen in runtimes.items():
            ttft, steps, _, tokens[name] = gen(prompt, a.output_len)
            results[name]["ttft"].append(ttft)
            results[name]["tpot"].append(p50(steps))
        for name, run in llama.items():
            r = run()
            results[name]["ttft"].append(r["ttft_ms"][0])
            results[name]["tpot"].append(r["tpot_ms_p50"][0])
            nbytes[name], types[name] = r["weight_bytes_per_token"], r["tensor_types"]
    same = torch.equal(tokens["npuflow"], reference)
    why = "" if same else " (" + divergence(fast, prompt, reference, tokens["npuflow"]) + ")"
    if a.cli:
        through_the_cli(src, qdir, a)
    notes = {name: run.note for name, run in llama.items() if run.note}
    return {"results": results, "bytes": nbytes, "types": types, "notes": notes, "compile_s": compile_s,
            "same": same, "why": why}


def report(a: argparse.Namespace, run: dict, bandwidth: list[float]) -> None:
    """The table, the acceptance lines, and the roofline figures."""
    bw = max(bandwidth)
    print(f"threads {a.threads}, input {a.input_len}, output {a.output_len}, {a.runs} interleaved runs each")
    print(f"read bandwidth, {a.threads} threads (torch sum over 256 MB, best of 5, before/after the runs): "
          f"{' / '.join(f'{b:.1f}' for b in bandwidth)} GB/s; MBU against {bw:.1f}")
    print(f"{'runtime':16} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'decode tok/s':>13} {'MB/token':>9} "
          f"{'GB/s':>6} {'MBU %':>6}")
    summary = {}
    for name, r in run["results"].items():
        ttft, tpot = p50(r["ttft"]), p50(r["tpot"])
        summary[name] = (ttft, tpot)
        mb = run["bytes"][name] / 1e6
        print(f"{name:16} {ttft:12.1f} {tpot:12.2f} {1e3 / tpot:13.1f} {mb:9.1f} {mb / tpot:6.1f} "
              f"{100 * mb / tpot / bw:6.1f}")
    (b_ttft, b_tpot), (f_ttft, f_tpot) = summary["hf-eager"], summary["npuflow"]
    print(f"w4a16 g128 (int4 packed kernel): decode {b_tpot / summary['npuflow-w4'][1]:.2f}x hf-eager")
    print("w8a16 (the acceptance line):")
    print(f"decode speed-up   {b_tpot / f_tpot:.2f}x   (target >= 2.5x)  {'OK' if b_tpot / f_tpot >= 2.5 else 'MISSED'}")
    print(f"TTFT ratio        {f_ttft / b_ttft:.2f}    (target <= 1.0)   {'OK' if f_ttft <= b_ttft else 'MISSED'}")
    print(f"compile time      {run['compile_s']:.1f} s (first engine run: trace + inductor)")
    print(f"greedy tokens of the compiled runtime == its eager reference: {run['same']}{run['why']}")
    if not run["types"]:
        print("llama.cpp: not installed (make llamacpp)")
        return
    for name, types in run["types"].items():
        print(f"{name}: GGUF tensor types {types}; {run['notes'].get(name, 'use_extra_bufts=True (default)')}")
    print("npuflow / llama.cpp on the same weights (decode: tok/s ratio, >= 1.0 is the issue 14 target; "
          "TTFT: ratio of times, <= 1.0):")
    for ours, theirs in (("npuflow", "llama.cpp-q8_0"), ("npuflow-w4", "llama.cpp-q4_0")):
        (ot, op), (tt, tp) = summary[ours], summary[theirs]
        print(f"  {ours:10} vs {theirs:14} decode {tp / op:.2f}x  TTFT {ot / tt:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed runs per runtime (after one warm-up)")
    p.add_argument("--cli", action="store_true", help="also compare through `npuflow benchmark --runtime`")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    bandwidth = [measure_cpu_bandwidth_gbs(threads=a.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        run = run_all(a, Path(tmp))
    bandwidth.append(measure_cpu_bandwidth_gbs(threads=a.threads))
    report(a, run, bandwidth)


if __name__ == "__main__":
    main()
