"""GGUF export for llama.cpp (benchmarks/gguf_export.py): the q/k row permutation against HF's rotary
embedding, the safetensors reader, and (with .venv-llamacpp, `make llamacpp`) the demo model written as
F32 GGUF and run by llama.cpp giving transformers' greedy tokens on the same prompt ids."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LLAMACPP_PY = REPO / ".venv-llamacpp" / "bin" / "python"
# the stamp is written last by infra/llamacpp/install.sh: a venv still building counts as absent
needs_llamacpp = pytest.mark.skipif(not any((REPO / ".venv-llamacpp").glob(".npuflow-llamacpp-*")),
                                    reason="the llama.cpp environment (.venv-llamacpp) is not installed: `make llamacpp`")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_permuted_rows_turn_hf_rotary_into_llamacpp_pairwise_rope():
    """q = W x rotated HF-style (rotate_half: dim i pairs with i + d/2) equals, after the permutation, the
    pairwise (GGML normal mode: dim 2i with 2i+1) rotation of the permuted W x, row for row."""
    exp = _load("gguf_export")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_head, d, hidden, pos = 4, 16, 32, 5
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_head * d, hidden, generator=g)
    x = torch.randn(hidden, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # (d/2,)
    ang = pos * inv
    cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()  # (d,)
    q = (w @ x).view(1, n_head, 1, d)
    hf, _ = apply_rotary_pos_emb(q, q, cos[None, None], sin[None, None])
    wp = torch.from_numpy(exp.permute_rows(w.numpy(), n_head))
    qp = (wp @ x).view(n_head, d // 2, 2)
    a, b = qp[..., 0], qp[..., 1]
    ggml = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], dim=-1)
    # undo the permutation on the output to compare in HF's order
    back = ggml.view(n_head, d // 2, 2).transpose(1, 2).reshape(n_head, d)
    torch.testing.assert_close(back, hf.view(n_head, d), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(wp, w)  # the permutation is not the identity


def test_safetensors_reader_matches_safetensors_including_bf16(tmp_path):
    from safetensors.torch import save_file

    exp = _load("gguf_export")
    t = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    save_file(t, tmp_path / "m.safetensors")
    got = exp.read_safetensors(tmp_path / "m.safetensors")
    for k, v in t.items():
        np.testing.assert_array_equal(got[k].astype(np.float32), v.float().numpy())


def test_quantized_checkpoint_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    exp = _load("gguf_export")
    save_file({"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 4, dtype=torch.int8)},
              tmp_path / "m.safetensors")
    with pytest.raises(SystemExit):
        exp.read_safetensors(tmp_path / "m.safetensors")


@needs_llamacpp
def test_demo_model_f32_gguf_gives_transformers_greedy_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "tiny.gguf"
    subprocess.run([str(LLAMACPP_PY), str(REPO / "benchmarks" / "gguf_export.py"), str(tiny_model_dir), str(out),
                    "--type", "f32"], check=True, capture_output=True, text=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("the cat sleeps in the garden and the dog", return_tensors="pt").input_ids  # (1, T)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    n = 16
    with torch.inference_mode():
        want = model.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)[0, prompt.shape[1]:]
    run = subprocess.run([str(LLAMACPP_PY), str(REPO / "benchmarks" / "llamacpp_bench.py"), str(out), "--prompt",
                          ",".join(map(str, prompt[0].tolist())), "--output-len", str(n), "--threads", "2"],
                         check=True, capture_output=True, text=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(got["tensor_types"]) == {"F32"}
    assert got["tokens"] == want.tolist()


@needs_llamacpp
def test_missing_config_is_one_clear_error(tmp_path):
    run = subprocess.run([str(LLAMACPP_PY), str(REPO / "benchmarks" / "gguf_export.py"), str(tmp_path),
                          str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "no config.json" in run.stderr and "Traceback" not in run.stderr
