"""Builds a tiny, really-trained Llama checkpoint in Hugging Face format, offline, for demos and tests."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

TINY_CORPUS_SEED_TRAIN = 0  # seed of the training corpus used by the demo
TINY_CORPUS_SEED_EVAL = 1  # seed of the held-out evaluation corpus (different sentences, same grammar)

_TRAIN_SENTENCES = 6000  # lines in the training corpus (~87k tokens)
_EVAL_SENTENCES = 800  # lines in the held-out text (~12k tokens, >= 8192 required)
_VOCAB_SIZE = 512  # 256 byte symbols + 4 specials + BPE merges
_SEQ_LEN = 128  # tokens per training window
_BATCH = 16  # windows per optimizer step
_LR = 3e-3  # peak AdamW learning rate
_WARMUP = 30  # steps of linear warmup before cosine decay
_SPECIALS = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}
# key and value in the demo model's config.json: the built-in corpora calibrate this model and no other
DEMO_MARKER = ("npuflow_demo", "tiny-llama")
# A plain chat template (the demo model was trained on sentences, not dialogues: chat answers continue
# the text): each message on its own line as "role: content", then "assistant:" to answer.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")

# ----------------------------------------------------------------------------------------------
# synthetic corpus: templated sentences with agreement between slots and fixed "facts".
# Entropy floor of the grammar ~0.41 nats/token (best possible perplexity ~1.51 with this tokenizer);
# the default build gets to ~1.55, so int8/int4 quantization error shows up as a visible increase.

_NAMES = {  # name -> (subject, possessive, object pronoun)
    "anna": ("she", "her", "her"),
    "maria": ("she", "her", "her"),
    "lucy": ("she", "her", "her"),
    "emma": ("she", "her", "her"),
    "tom": ("he", "his", "him"),
    "peter": ("he", "his", "him"),
    "jack": ("he", "his", "him"),
    "david": ("he", "his", "him"),
}
_ANIMALS = {  # singular -> (plural, habitat, sound)
    "cat": ("cats", "house", "meows"),
    "dog": ("dogs", "yard", "barks"),
    "bird": ("birds", "tree", "sings"),
    "fish": ("fish", "river", "swims"),
    "horse": ("horses", "field", "runs"),
    "cow": ("cows", "barn", "moos"),
    "fox": ("foxes", "forest", "hides"),
    "frog": ("frogs", "pond", "jumps"),
}
_FRUITS = {  # fruit -> color
    "apple": "red",
    "banana": "yellow",
    "lemon": "yellow",
    "grape": "purple",
    "orange": "orange",
    "lime": "green",
    "cherry": "red",
    "plum": "purple",
}
_VERBS = {"sleep": "sleeps", "eat": "eats", "play": "plays", "wait": "waits", "rest": "rests"}
_PLACES = ["garden", "kitchen", "park", "market", "station", "library"]
_OBJECTS = ["book", "hat", "bag", "cup", "key", "ball"]
_FURNITURE = ["table", "chair", "shelf", "bed"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _sentence(rng: random.Random) -> str:
    """One sentence from one of 8 templates; free slots are random, the rest follows from them."""
    kind = rng.randrange(8)
    name, name2 = rng.sample(sorted(_NAMES), 2)
    he, his, him = _NAMES[name]
    animal = rng.choice(sorted(_ANIMALS))
    animals, habitat, sound = _ANIMALS[animal]
    fruit = rng.choice(sorted(_FRUITS))
    if kind == 0:  # subject-verb number agreement
        verb = rng.choice(sorted(_VERBS))
        if rng.random() < 0.5:
            return f"the {animal} {_VERBS[verb]} in the {habitat} ."
        return f"the {animals} {verb} in the {habitat} ."
    if kind == 1:  # gender agreement across the sentence
        return f"{name} gave {his} {rng.choice(_OBJECTS)} to {name2} , and {name2} said thank you to {him} ."
    if kind == 2:  # fixed facts: habitat and sound follow from the animal
        return f"the {animal} lives in the {habitat} , and it {sound} there all day ."
    if kind == 3:  # question-answer pairs over fixed facts
        return f"what color is the {fruit} ? the {fruit} is {_FRUITS[fruit]} ."
    if kind == 4:  # counting: singular after one, plural otherwise; is/are agreement
        i = rng.randrange(1, len(_NUMBERS))  # _NUMBERS[i] is the word for i
        obj, where = rng.choice(_OBJECTS), rng.choice(_FURNITURE)
        if i == 1:
            return f"there is one {obj} on the {where} , one more than zero ."
        return f"there are {_NUMBERS[i]} {obj}s on the {where} , one more than {_NUMBERS[i - 1]} ."
    if kind == 5:  # successor days
        i = rng.randrange(len(_DAYS))
        d1, d2 = _DAYS[(i + 1) % len(_DAYS)], _DAYS[(i + 2) % len(_DAYS)]
        return f"after {_DAYS[i]} comes {d1} , and after {d1} comes {d2} ."
    if kind == 6:  # pronoun reference to a name introduced earlier
        return f"{name} likes the {_FRUITS[fruit]} {fruit} , so {he} eats it in the {rng.choice(_PLACES)} ."
    # kind 7: possessive + fact reuse
    return f"{name} has a {animal} , and {his} {animal} {sound} in the {habitat} ."


def synthetic_corpus(n_sentences: int, seed: int) -> str:
    """Deterministic templated English-like sentences, one per line (same args -> same text)."""
    rng = random.Random(seed)
    return "\n".join(_sentence(rng) for _ in range(n_sentences)) + "\n"


def eval_text() -> str:
    """The held-out evaluation text used by the demo's validation stage (`builtin:tiny-corpus`)."""
    return synthetic_corpus(_EVAL_SENTENCES, seed=TINY_CORPUS_SEED_EVAL)


# ----------------------------------------------------------------------------------------------
# tokenizer: small byte-level BPE trained on the corpus, wrapped for transformers


def _train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes; decode(encode(x)) == x), BOS prepended when adding special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(_SPECIALS.values())
    tok = Tokenizer(models.BPE(unk_token=_SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=specials,  # ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos = _SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_SPECIALS["bos"],
        eos_token=_SPECIALS["eos"],
        unk_token=_SPECIALS["unk"],
        pad_token=_SPECIALS["pad"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


# ----------------------------------------------------------------------------------------------
# model + training


# Model sizes build_tiny_llama trains on the same corpus and tokenizer. "demo" (the default, ~0.87M params at
# vocab 512: 4 x 184k per block + 2 x 65.5k for embed_tokens and lm_head) is the demo and test model; "small"
# (~6.6M: 8 x 786k + 2 x 131k, head_dim 64) is the larger trained model quality figures are also measured on.
SIZES = {
    "demo": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 4,
              "num_key_value_heads": 2},
}


def _llama_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, size: str = "demo") -> LlamaConfig:
    """d_model a multiple of 128 and d_ff = 3 * d_model, so every int4 group size divides both; GQA (2 query
    heads share each kv head)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        **SIZES[size],
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # lm_head is its own (V, d_model) tensor
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
        **dict([DEMO_MARKER]),
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logger, tqdm bars and Python warnings for the duration (restores all)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _lr_at(step: int, steps: int) -> float:
    """Linear warmup then cosine decay to 10% of the peak (multiplier of _LR)."""
    if step < _WARMUP:
        return (step + 1) / _WARMUP
    frac = (step - _WARMUP) / max(1, steps - _WARMUP)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


def _train(model: torch.nn.Module, data: torch.Tensor, steps: int, seed: int, progress: bool) -> float:
    """Train on random (B, T) windows of the 1-D token stream `data`; returns the last loss (nats/token)."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matmul weights and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm gains
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=_LR,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, steps))
    model.train()
    t0 = time.perf_counter()
    loss_val = float("nan")
    for step in range(steps):
        ix = torch.randint(0, data.numel() - _SEQ_LEN - 1, (_BATCH,), generator=gen)  # (B,) window starts
        x = torch.stack([data[i : i + _SEQ_LEN] for i in ix.tolist()])  # (B, T) token ids
        loss = model(input_ids=x, labels=x).loss  # mean next-token cross-entropy, nats
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        if progress and (step % 50 == 0 or step == steps - 1):
            dt = time.perf_counter() - t0
            print(f"tinymodel: step {step:4d}/{steps} loss {loss_val:.4f} ({dt:.1f}s)", file=sys.stderr)
    model.eval()
    return loss_val


# ----------------------------------------------------------------------------------------------
# build + publish


def _write_sha256sums(d: Path) -> None:
    """Write d/SHA256SUMS (`sha256sum` format: '<64 hex>  <relpath>') over every other file in d."""
    lines = []
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):  # 1 MiB per read
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {f.relative_to(d).as_posix()}\n")
        f.chmod(0o644)  # safetensors writes 0600; published files are world-readable like the rest
    (d / "SHA256SUMS").write_text("".join(lines))
    (d / "SHA256SUMS").chmod(0o644)


def build_tiny_llama(out_dir: Path, *, steps: int = 300, seed: int = 0, progress: bool = False,
                     size: str = "demo") -> Path:
    """Train and write a tiny Llama (`size`: a key of SIZES) in HF format into out_dir; return out_dir.

    Files: config.json, generation_config.json, model.safetensors, tokenizer files, SHA256SUMS.
    Written into a hidden sibling temp dir and renamed into place only when complete.
    """
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        with (
            _quiet_transformers(),
            _torch_threads(min(2, os.cpu_count() or 1)),
            torch.random.fork_rng(devices=[]),
        ):
            text = synthetic_corpus(_TRAIN_SENTENCES, seed=TINY_CORPUS_SEED_TRAIN)
            tok = _train_tokenizer(text)
            data = torch.tensor(
                tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long
            )  # (N,) ids
            torch.manual_seed(seed)  # weight init
            cfg = _llama_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, size)
            model = LlamaForCausalLM(cfg).to(torch.float32)
            if progress:
                n_params = sum(p.numel() for p in model.parameters())
                print(
                    f"tinymodel: {n_params / 1e6:.2f}M params, {data.numel()} train tokens", file=sys.stderr
                )
            loss = _train(model, data, steps, seed, progress)
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        _write_sha256sums(tmp)
        if out_dir.exists():  # appeared while we were training
            raise FileExistsError(f"{out_dir} already exists; refusing to overwrite")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        dt = time.perf_counter() - t0
        print(f"tinymodel: wrote {out_dir} in {dt:.1f}s (final train loss {loss:.4f})", file=sys.stderr)
    return out_dir


def perplexity(model_dir: Path, text: str, seq_len: int = 128) -> float:
    """Token-level perplexity of the saved fp32 model on `text`, over non-overlapping seq_len windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (N,)
    model.eval()
    nll, count = 0.0, 0  # summed nats, predicted tokens
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, seq_len):
            x = ids[start : start + seq_len].unsqueeze(0)  # (1, T)
            if x.shape[1] < 2:
                break
            loss = model(input_ids=x, labels=x).loss  # mean over T-1 predictions, nats
            nll += loss.item() * (x.shape[1] - 1)
            count += x.shape[1] - 1
    return math.exp(nll / count)
