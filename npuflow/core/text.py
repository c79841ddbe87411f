"""Evaluation and calibration text: builtin:, file:// and s3:// URIs, and token windows over it."""

from __future__ import annotations

import torch

from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.core.store import open_store


def load_eval_text(uri: str) -> str:
    """builtin:tiny-corpus (held out) | builtin:tiny-corpus-train | file://PATH | s3://bucket/key (UTF-8).

    A path ending in .jsonl is JSON lines (pile-val, wikitext dumps): the "text" fields, one after another.
    """
    if uri.startswith("builtin:"):
        from npuflow.demo import tinymodel

        builtins = {
            "builtin:tiny-corpus": tinymodel.eval_text,
            "builtin:tiny-corpus-train": lambda: tinymodel.synthetic_corpus(2000, tinymodel.TINY_CORPUS_SEED_TRAIN),
        }
        if uri not in builtins:
            raise ConfigError(f"unknown built-in text {uri!r}; valid: {', '.join(builtins)}")
        return builtins[uri]()
    if uri.startswith("file://"):
        from npuflow.core.store import file_uri_path

        path = file_uri_path(uri)
        if not path.is_file():
            raise NpuflowError(f"text file {path} does not exist ({uri})")
        return _json_lines(uri, path.read_text())
    if uri.startswith("s3://"):
        bucket_prefix, _, key = uri.removeprefix("s3://").partition("/")
        return _json_lines(uri, open_store(f"s3://{bucket_prefix}").read_bytes(key).decode())
    raise ConfigError(f"unknown text uri {uri!r}; valid: builtin:tiny-corpus, file://PATH, s3://BUCKET/KEY")


def _json_lines(uri: str, text: str) -> str:
    """The "text" field of each line of a .jsonl file, joined by blank lines; other files unchanged."""
    if not uri.endswith(".jsonl"):
        return text
    import json

    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            out.append(json.loads(line)["text"] if line.strip() else "")
        except (ValueError, KeyError, TypeError):
            raise NpuflowError(f"line {n} of {uri} is not a JSON object with a \"text\" string") from None
    return "\n\n".join(t for t in out if t)


def make_windows(token_ids: list[int], seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len) from the first max_tokens tokens."""
    ids = torch.tensor(token_ids[:max_tokens], dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise NpuflowError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a longer text or a smaller validation.seq_len"
        )
    return ids[: n * seq_len].view(n, seq_len)
