"""Every scheme/format pair the CLI accepts quantizes, reads back and runs; the others are refused."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from npuflow.core.config import QuantizationConfig
from npuflow.quant.streaming import quantize_dir
from npuflow.runtime.backends import cpu
from npuflow.runtime.loader import load_quantized, load_reference

SCHEMES = {"w8a16": [None], "w4a16": [32, 64], "w8a8": [None], "w8a8-dynamic": [None]}
FORMATS = ("native", "msmodelslim", "compressed-tensors")
ACCEPTED = {
    ("w8a16", "native"), ("w8a16", "msmodelslim"), ("w8a16", "compressed-tensors"),
    ("w4a16", "native"), ("w4a16", "compressed-tensors"),
    *((s, f) for s in ("w8a8", "w8a8-dynamic") for f in FORMATS),
}


def _cfg(scheme: str, group: int | None, fmt: str) -> QuantizationConfig:
    return QuantizationConfig(scheme=scheme, group_size=group, format=fmt)


def test_the_accepted_pairs_are_exactly_these() -> None:
    accepted = set()
    for scheme, fmt in itertools.product(SCHEMES, FORMATS):
        try:
            _cfg(scheme, SCHEMES[scheme][0], fmt)
            accepted.add((scheme, fmt))
        except ValueError as err:
            assert "supported" in str(err) or "keep" in str(err)
    assert accepted == ACCEPTED
    with pytest.raises(ValueError, match="group_size applies to w4a16 only"):
        _cfg("w8a16", 64, "native")
    with pytest.raises(ValueError, match="group_size"):
        _cfg("w4a16", 48, "native")  # not one of 32/64/128


@pytest.mark.parametrize(("scheme", "group", "fmt"), [
    (s, g, f) for (s, f) in sorted(ACCEPTED) for g in SCHEMES[s]
])
def test_accepted_pair_runs_close_to_the_float_model(scheme, group, fmt, tiny_random_llama_dir: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "q"
    if scheme.startswith("w8a8"):  # calibrated (SmoothQuant) on token windows: this checkpoint has no tokenizer
        from tests.unit.test_w8a8 import _quantize

        qm = _quantize(tiny_random_llama_dir, out, scheme, 0.5, fmt)
    else:
        out.mkdir()
        qm = quantize_dir(tiny_random_llama_dir, out, _cfg(scheme, group, fmt))
    assert qm["format"] == fmt and qm["scheme"] == scheme
    model = load_quantized(out, cpu, torch.float32)
    ref = load_reference(tiny_random_llama_dir, torch.device("cpu"))
    ids = torch.arange(24).unsqueeze(0) * 5 % 128
    with torch.inference_mode():
        a, b = model(ids).logits, ref(ids).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    # static W8A8: one activation range per linear (per-tensor), coarser than per token on this random model
    assert 0 < err < {"w4a16": 0.25, "w8a8": 0.1}.get(scheme, 0.05), err
