"""HF Llama checkpoint (float safetensors) -> GGUF for llama.cpp: F32/F16 with gguf-py, Q8_0/Q4_0 by llama.cpp.

    .venv-llamacpp/bin/python benchmarks/gguf_export.py MODEL_DIR OUT.gguf [--type f32|f16|q8_0|q4_0] [--threads 2]

Runs in .venv-llamacpp (`make llamacpp`): it needs only numpy and gguf (and llama_cpp for the quantized
types, sentencepiece for a tokenizer.model); npuflow's own venv calls it as a subprocess. Q8_0 and Q4_0 go
through an F16 file and llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs, with
its default per-tensor choices: for Q4_0 the output matrix becomes Q6_K where its rows allow).

Layout follows llama.cpp's convert_hf_to_gguf.py (ggml-org/llama.cpp, class LlamaModel: tensor names,
the q/k row permutation, the llama.* keys) and gguf-py's GGUFWriter/constants; matched, not copied.
The output is written next to OUT under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

TYPES = ("f32", "f16", "q8_0", "q4_0")
# llama_ftype values (llama.h / gguf.LlamaFileType) of the quantized outputs
_QUANT_FTYPE = {"q8_0": 7, "q4_0": 2}
# HF name (after "model.layers.N.") -> llama.cpp name (after "blk.N."); gguf-py tensor_mapping.py MODEL_TENSOR
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
# SentencePiece token types as llama.cpp reads them (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def fail(msg: str) -> None:
    """One clear message and a non-zero exit (this script runs outside npuflow's venv, without its errors)."""
    print(f"gguf_export: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of one .safetensors file as numpy arrays (memory-mapped; BF16 widened to float32).
    Format: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw, dtype = data[a:b], info["dtype"]
        if dtype == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("F32", "F16"):
            arr = raw.view(np.float32 if dtype == "F32" else np.float16)
        else:
            fail(f"{path.name}: tensor {name} is {dtype}; the GGUF export reads float checkpoints (F32/F16/BF16): "
                 "pass the unquantized source model, llama.cpp quantizes it (--type q8_0|q4_0)")
        out[name] = arr.reshape(info["shape"])
    return out


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate_half (each head's first half of dims, then its second half); llama.cpp's
    rope pairs adjacent dims, so each head's rows go (2, d/2) -> (d/2, 2), as LlamaModel.permute does in
    convert_hf_to_gguf.py. w (n_head * head_dim, in) -> same shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model_dir: Path, cfg: dict) -> dict[str, np.ndarray]:
    """llama.cpp name -> array (q/k permuted), from every *.safetensors file in model_dir."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        fail(f"no *.safetensors in {model_dir}: the GGUF export reads a Hugging Face safetensors checkpoint")
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    out = {}
    for f in files:
        for name, arr in read_safetensors(f).items():
            if name in _TOP:
                out[_TOP[name]] = arr
                continue
            parts = name.split(".")  # model.layers.N.<module...>.weight
            key = ".".join(parts[3:-1])
            if parts[:2] != ["model", "layers"] or key not in _BLOCK or parts[-1] != "weight":
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                fail(f"{f.name}: tensor {name} is not part of a Llama checkpoint (bias or unknown module)")
            if key == "self_attn.q_proj":
                arr = permute_rows(arr, n_head)
            elif key == "self_attn.k_proj":
                arr = permute_rows(arr, n_kv)
            out[f"blk.{parts[2]}.{_BLOCK[key]}.weight"] = arr
    if "output.weight" not in out and not cfg.get("tie_word_embeddings", False):
        fail(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false: the checkpoint is incomplete")
    return out


def add_hparams(w, cfg: dict, name: str) -> None:
    """The llama.* keys llama.cpp's loader reads (llama-model.cpp, LLM_ARCH_LLAMA)."""
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)


def vocab_sentencepiece(path: Path) -> tuple[str, list[bytes], list[float], list[int], list[bytes]]:
    """tokenizer.model (Llama-2 style): pieces, scores and types, llama.cpp's "llama" tokenizer."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        fail(f"{path} needs the sentencepiece package: run `make llamacpp` (infra/llamacpp/requirements.txt)")
    sp = SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(_UNKNOWN if sp.is_unknown(i) else _CONTROL if sp.is_control(i) else
                     _UNUSED if sp.is_unused(i) else _BYTE if sp.is_byte(i) else _NORMAL)
    return "llama", tokens, scores, types, []


def vocab_bpe(path: Path) -> tuple[str, list[bytes], list[float], list[int], list[bytes]]:
    """tokenizer.json with a byte-level BPE (GPT-2 style, the demo model's): llama.cpp's "gpt2" tokenizer."""
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        fail(f"{path}: only byte-level BPE tokenizers are exported from tokenizer.json (a SentencePiece model "
             "needs its tokenizer.model next to it)")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]").encode() for i in range(n)]
    types = [_CONTROL if i in special else _NORMAL if i in by_id else _USER_DEFINED for i in range(n)]
    merges = [(m if isinstance(m, str) else " ".join(m)).encode() for m in model.get("merges", [])]
    return "gpt2", tokens, [0.0] * n, types, merges


def vocab_placeholder(n: int) -> tuple[str, list[bytes], list[float], list[int], list[bytes]]:
    """No tokenizer in the checkpoint (the benchmark's random Llama; prompts are token ids): a SentencePiece-
    shaped vocabulary of n tokens, <unk> <s> </s>, the 256 byte tokens, then <tok_N>."""
    if n < 259:
        fail(f"vocab_size {n} is too small for a placeholder vocabulary (>= 259): add a tokenizer.json")
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{b:02X}>".encode() for b in range(256))]
    tokens += [f"<tok_{i}>".encode() for i in range(len(tokens), n)]
    types = [_UNKNOWN, _CONTROL, _CONTROL, *[_BYTE] * 256, *[_NORMAL] * (n - 259)]
    return "llama", tokens, [0.0] * n, types, []


def add_vocab(w, model_dir: Path, cfg: dict) -> str:
    """Tokenizer metadata, tokenizer.model first (as convert_hf_to_gguf.py prefers for Llama), then
    tokenizer.json, else a placeholder; padded to the embedding's vocab_size. Returns which one."""
    n = cfg["vocab_size"]
    if (model_dir / "tokenizer.model").is_file():
        kind, tokens, scores, types, merges = vocab_sentencepiece(model_dir / "tokenizer.model")
    elif (model_dir / "tokenizer.json").is_file():
        kind, tokens, scores, types, merges = vocab_bpe(model_dir / "tokenizer.json")
    else:
        kind, tokens, scores, types, merges = vocab_placeholder(n)
    if len(tokens) > n:
        fail(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {n}")
    pad = n - len(tokens)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), n)]
    scores += [0.0] * pad
    types += [_USER_DEFINED] * pad
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])
    if kind == "llama" and not (model_dir / "tokenizer.model").is_file():
        w.add_unk_token_id(0)
    return kind


def write_float(model_dir: Path, out: Path, ftype: str) -> str:
    """F32 or F16 GGUF (1-D norm weights stay F32, as llama.cpp's converter keeps them). Returns the vocab kind."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    if "LlamaForCausalLM" not in (cfg.get("architectures") or []):
        fail(f"{model_dir}: architectures {cfg.get('architectures')} is not LlamaForCausalLM")
    tensors = gguf_tensors(model_dir, cfg)
    w = gguf.GGUFWriter(str(out), "llama")
    add_hparams(w, cfg, model_dir.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    kind = add_vocab(w, model_dir, cfg)
    for name, arr in tensors.items():
        dtype = np.float16 if ftype == "f16" and arr.ndim == 2 else np.float32
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kind


def quantize(src: Path, out: Path, qtype: str, threads: int) -> None:
    """llama.cpp's own quantizer on an F16 GGUF (llama_model_quantize, default params as llama-quantize)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _QUANT_FTYPE[qtype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        fail(f"llama_model_quantize to {qtype} failed (return code {rc})")


def export(model_dir: Path, out: Path, qtype: str, threads: int = 2) -> None:
    """Write OUT atomically: every intermediate lives under a temporary name beside it."""
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir} has no config.json: pass a Hugging Face Llama checkpoint directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    f16 = out.with_name(f".{out.name}.f16-{os.getpid()}")
    try:
        if qtype in ("f32", "f16"):
            kind = write_float(model_dir, tmp, qtype)
        else:
            kind = write_float(model_dir, f16, "f16")
            quantize(f16, tmp, qtype, threads)
        os.replace(tmp, out)
    finally:
        for p in (tmp, f16):
            p.unlink(missing_ok=True)
    print(f"wrote {out} ({qtype}, tokenizer {kind}, {out.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, help="Hugging Face Llama checkpoint (config.json + *.safetensors)")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=TYPES, help="weight type of the 2-D tensors")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp quantizer threads")
    a = p.parse_args()
    export(a.model_dir, a.out, a.type, a.threads)


if __name__ == "__main__":
    main()
