"""A Llama checkpoint as the quantizer reads it: shard names, which tensors are targets, expected shapes."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from npuflow.core.errors import NpuflowError
from npuflow.core.paths import confined

QUANT_MANIFEST = "quant_manifest.json"
INDEX = "model.safetensors.index.json"
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM")  # same module names and weight layout
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# linear layers of a Llama decoder; each weight is (out_features, in_features)
LINEAR_SUFFIXES = tuple(f"{m}.weight" for m in LINEAR_MODULES)
HEAD_AND_EMBED = ("lm_head.weight", "model.embed_tokens.weight")  # quantized only when not ignored


def shard_names(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors files in order; every file the index names must exist.

    Each name stays inside model_dir (no `..` part, no absolute path): a crafted index
    is refused here, before any shard is read or any output written; so is a truncated shard.
    """
    if (model_dir / INDEX).is_file():
        try:
            index = json.loads((model_dir / INDEX).read_text())
            weight_map = index["weight_map"]
            shards = sorted(set(weight_map.values()), key=str)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise NpuflowError(f"{model_dir / INDEX} is not a valid safetensors index ({err!r}); "
                               "re-fetch the model") from None
        for s in shards:
            confined(model_dir, s, source=str(model_dir / INDEX))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise NpuflowError(f"{INDEX} names shards that are missing: {', '.join(missing)}; re-fetch the model")
    else:
        shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if len(shards) != 1:
            raise NpuflowError(
                f"{model_dir} has {len(shards)} safetensors files and no {INDEX}: expected one file or an index"
            )
    for s in shards:  # a truncated shard is named here, before any output is written
        check_shard(model_dir / s)
    return shards


def is_target(name: str, ignore: tuple[str, ...]) -> bool:
    """A weight this run quantizes: a linear (or the head/embedding) whose module no pattern ignores."""
    if not (name.endswith(LINEAR_SUFFIXES) or name in HEAD_AND_EMBED):
        return False
    module = name.removesuffix(".weight")
    return not any(fnmatch.fnmatch(module, pat) or fnmatch.fnmatch(name, pat) for pat in ignore)


def check_llama(hf_config: dict) -> None:
    archs = hf_config.get("architectures") or []
    if not set(archs) & set(LLAMA_FAMILY):
        raise NpuflowError(
            f"architecture {archs or 'unknown'} is not Llama-family; supported: {', '.join(LLAMA_FAMILY)}"
        )


def expected_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear suffix from config.json, to catch shards that do not match it."""
    d, ffn = hf_config["hidden_size"], hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or d // heads
    kv = hf_config.get("num_key_value_heads") or heads
    return {
        "q_proj.weight": (heads * head_dim, d), "k_proj.weight": (kv * head_dim, d),
        "v_proj.weight": (kv * head_dim, d), "o_proj.weight": (d, heads * head_dim),
        "gate_proj.weight": (ffn, d), "up_proj.weight": (ffn, d), "down_proj.weight": (d, ffn),
    }


# ---- what a run needs before it starts: calibration text, a tokenizer, whole shards ----------------

# files from which transformers' AutoTokenizer builds a tokenizer (one of them must be present)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")


def calibrated_by(cfg) -> list[str]:
    """The parts of a QuantizationConfig that run calibration text through the model (none: RTN alone)."""
    return [why for why, on in (("method gptq", cfg.method == "gptq"), ("sensitivity", cfg.sensitivity),
                                (f"scheme {cfg.scheme} (SmoothQuant)", cfg.scheme.startswith("w8a8")),
                                ("fallback auto", cfg.fallback == "auto"),
                                (f"scheme {cfg.scheme} (SmoothQuant)", cfg.scheme.startswith("w8a8"))) if on]


def is_demo(hf_config: dict) -> bool:
    """The generated demo model (npuflow/demo/tinymodel.py marks its config.json)."""
    from npuflow.demo.tinymodel import DEMO_MARKER

    return hf_config.get(DEMO_MARKER[0]) == DEMO_MARKER[1]


def check_calibration(cfg, hf_config: dict, file_names, texts: dict[str, str] | None = None) -> None:
    """Refuse, before any work, a calibrated run that has no meaningful text or no tokenizer to cut it.

    cfg: QuantizationConfig; file_names: the checkpoint's files; texts: other text this run feeds the
    model ({"validation.eval_text": uri} for fallback auto). The built-in corpora are the demo model's
    training and held-out text: on any other model they say nothing about its activations.
    """
    from npuflow.core.errors import ConfigError

    users = calibrated_by(cfg)
    if not users:
        return
    texts = {"quantization.calibration.text": cfg.calibration.text, **(texts or {})}
    builtin = {k: v for k, v in texts.items() if v.startswith("builtin:")}
    if builtin and not is_demo(hf_config):
        key, uri = next(iter(builtin.items()))
        cli = "; --calibration URI on the command line" if key.startswith("quantization.") else ""
        raise ConfigError(
            f"{' and '.join(users)} run(s) text through the model, and {key} is {uri!r}: the demo model's "
            "synthetic corpus, meaningless for this model. Name a set of real text: "
            f"{key}: s3://BUCKET/pile-val.jsonl or file:///PATH/wikitext.txt (UTF-8 text, or JSON lines with "
            f"a \"text\" field){cli}. Or quantize with RTN and no sensitivity. (A demo model built before "
            "npuflow marked it in config.json: rebuild it with npuflow make-tiny-model.)"
        )
    names = {Path(n).name for n in file_names}
    if not names & set(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in names):
        raise NpuflowError(
            f"{' and '.join(users)} need(s) the model's tokenizer to cut the calibration text, and the "
            f"checkpoint has none (looked for {', '.join(TOKENIZER_FILES)}): add the tokenizer files to the "
            "checkpoint, or quantize with method rtn, sensitivity off and fallback none (no tokenizer needed)"
        )


def load_tokenizer(model_dir: Path, why: str):
    """The checkpoint's tokenizer, or one NpuflowError saying why it cannot be built and who needs it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # transformers raises ValueError/ImportError/OSError, with long messages
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise NpuflowError(
            f"{why} need(s) the tokenizer of {model_dir}, which could not be loaded: {first[:300]} "
            "(install what it names, e.g. pip install sentencepiece, or quantize with method rtn, "
            "sensitivity off and fallback none)"
        ) from None


def check_shard(path: Path, origin: str = "", fix: str = "re-fetch the model (or re-copy that shard)") -> None:
    """A safetensors file whose header promises more bytes than the file holds is refused, named.

    origin: where it came from (" from s3://...", default " in DIR"); fix: what to do.
    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
    then the data; the largest data_offsets end is the data size (safetensors' own format spec).
    """
    origin = origin or f" in {path.parent}"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise NpuflowError(f"{path.name}{origin} is not a valid safetensors file ({err}): it is truncated or "
                           f"corrupt; {fix}") from None
    if 8 + n + end > size:
        raise NpuflowError(f"{path.name}{origin} is truncated: its header describes {8 + n + end} bytes, the "
                           f"file has {size}; {fix}")
