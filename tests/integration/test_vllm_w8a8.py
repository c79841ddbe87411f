"""npuflow's compressed-tensors W8A8 output loaded by vLLM CPU (issue 12 acceptance): on the 220M benchmark
Llama, vLLM's greedy next token agrees with npuflow's own W8A8 runtime on >= 15 of 16 prompts, and vLLM's
log-probabilities are as close to npuflow's float32 ones as npuflow's own bfloat16 run is. One vLLM start
(offline LLM in the project's vLLM environment). Needs `make vllm` (.venv-vllm); CI installs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.serving import SHAPE, build_source
from npuflow.core.config import QuantizationConfig
from npuflow.quant.model import quantize_model
from npuflow.runtime.backends import cpu
from npuflow.runtime.loader import load_quantized

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
if not VLLM_PY.is_file():
    pytest.skip("the vLLM environment is absent: run `make vllm` (CI does)", allow_module_level=True)

POOL, PROMPTS, PROMPT_LEN = 64, 16, 12  # prompts of random word tokens
# vLLM offline: greedy, one new token per prompt; prints {"tokens": [...], "top": [{token: logprob} x 5 per prompt],
# "scheme": <the linear method>}
VLLM_NEXT_TOKEN = """
import json, sys
from vllm import LLM, SamplingParams
model, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(max_tokens=1, temperature=0, logprobs=5))
scheme = llm.apply_model(lambda m: type(m.model.layers[0].self_attn.qkv_proj.scheme).__name__)[0]
top = [{k: v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outs]
print("RESULT " + json.dumps({"tokens": [o.outputs[0].token_ids[0] for o in outs], "top": top, "scheme": scheme}))
"""


def test_vllm_cpu_runs_npuflow_w8a8_and_agrees_with_npuflow(tmp_path: Path) -> None:
    src = build_source(tmp_path)
    g = torch.Generator().manual_seed(1)
    words = torch.randint(3, SHAPE["vocab_size"], (4096,), generator=g).tolist()
    text = tmp_path / "calibration.txt"  # random words: the model is random too
    text.write_text(" ".join(f"w{i}" for i in words))
    out = tmp_path / "w8a8-ct"
    out.mkdir()
    cfg = QuantizationConfig(scheme="w8a8-dynamic", format="compressed-tensors",
                             calibration={"text": text.as_uri(), "samples": 4, "seq_len": 64})
    quantize_model(src, out, cfg)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"

    prompts = torch.randint(3, SHAPE["vocab_size"], (POOL, PROMPT_LEN), generator=g)  # (64, 12)
    # npuflow's W8A8 runtime with float32 activations around the same int8 GEMMs, and in bfloat16, the dtype vLLM
    # CPU runs W8A8 in (int8_scaled_mm_with_quant refuses float32)
    ours = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_quantized(out, cpu, dtype)
        with torch.inference_mode():
            ours[dtype] = model(prompts).logits[:, -1].float().log_softmax(-1)  # (64, vocab) next-token log-probs
        del model
    ref, half = ours[torch.float32], ours[torch.bfloat16]

    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine in this process: apply_model can run a lambda
    proc = subprocess.run([str(VLLM_PY), "-c", VLLM_NEXT_TOKEN, str(out), json.dumps(prompts.tolist())],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["scheme"] == "CompressedTensorsW8A8Int8"
    theirs = result["tokens"]
    top = [{int(k): v for k, v in t.items()} for t in result["top"]]

    # 1. Log-probabilities: vLLM's (bfloat16) differ from npuflow's float32 ones by about what npuflow's own
    # bfloat16 run does (measured on an AMD EPYC host: mean |d| 0.017 for both, max 0.057 vs 0.068). This catches
    # gross loading errors only: on this random model vLLM's W8A8 is about as close to the float source model
    # (mean 0.023, max 0.087) as to npuflow's W8A8, the quantization error being the size of bfloat16 rounding.
    vllm_d = torch.tensor([abs(lp - ref[i, t].item()) for i in range(POOL) for t, lp in top[i].items()])
    half_d = torch.tensor([abs(half[i, t].item() - ref[i, t].item()) for i in range(POOL) for t in top[i]])
    assert vllm_d.mean() <= 2 * half_d.mean() and vllm_d.max() <= 2 * half_d.max(), (vllm_d, half_d)

    # 2. Greedy next token on 16 prompts whose answer is decided: the random model's top-2 log-probs are often
    # closer than bfloat16 rounding moves them (margins 0.0002-0.045 on the 6 of 64 where vLLM picks another
    # token). The 16 are the first whose float32 margin exceeds twice the largest deviation of npuflow's own
    # bfloat16 run, so any faithful bfloat16 implementation picks the same token there.
    noise = half_d.max().item()
    best = ref.topk(2, dim=-1).values
    decided = [i for i in range(POOL) if (best[i, 0] - best[i, 1]).item() > 2 * noise][:PROMPTS]
    assert len(decided) == PROMPTS, (noise, best[:, 0] - best[:, 1])
    greedy = ref.argmax(-1).tolist()
    agree = sum(greedy[i] == theirs[i] for i in decided)
    everywhere = sum(a == b for a, b in zip(greedy, theirs, strict=True))
    assert agree >= 15, (agree, everywhere, noise, [(greedy[i], theirs[i]) for i in decided])
