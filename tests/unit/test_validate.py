"""Validation: the quality gates (pure), evaluation windows, and the reference-vs-candidate comparison."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from npuflow.core.config import GateConfig
from npuflow.core.errors import ConfigError, NpuflowError
from npuflow.core.text import load_eval_text, make_windows
from npuflow.eval.quality import compare, evaluate_gates

GATES = GateConfig(ppl_delta_pct_max=1.0, top1_agreement_min=0.95, kl_divergence_max=0.05)
GOOD = {"ppl_delta_pct": 0.2, "top1_agreement": 0.99, "kl_divergence": 0.001}


# ---------------------------------------------------------------------------------------------- gates


def test_all_gates_pass() -> None:
    gates = evaluate_gates({**GOOD, "ppl_reference": 3.0}, GATES)  # other metrics are ignored
    assert set(gates) == {"ppl_delta_pct", "top1_agreement", "kl_divergence"}
    assert all(g.passed for g in gates.values())
    assert gates["ppl_delta_pct"].op == "<=" and gates["top1_agreement"].op == ">="
    assert gates["kl_divergence"].value == 0.001 and gates["kl_divergence"].threshold == 0.05


def test_boundary_values_pass() -> None:
    gates = evaluate_gates({"ppl_delta_pct": 1.0, "top1_agreement": 0.95, "kl_divergence": 0.05}, GATES)
    assert all(g.passed for g in gates.values())


@pytest.mark.parametrize(
    ("metric", "value"),
    [
        ("ppl_delta_pct", 1.0001),  # <= gate, just above
        ("ppl_delta_pct", 250.0),
        ("top1_agreement", 0.9499),  # >= gate, just below
        ("top1_agreement", 0.0),
        ("kl_divergence", 0.0501),
        ("kl_divergence", math.nan),  # a broken measurement never passes
        ("ppl_delta_pct", math.nan),
        ("top1_agreement", math.nan),
    ],
)
def test_one_gate_fails(metric: str, value: float) -> None:
    gates = evaluate_gates({**GOOD, metric: value}, GATES)
    assert {n for n, g in gates.items() if not g.passed} == {metric}


def test_better_than_reference_passes() -> None:
    # quantization noise can make the candidate slightly better: a negative delta is fine
    gates = evaluate_gates({**GOOD, "ppl_delta_pct": -0.5, "kl_divergence": 0.0}, GATES)
    assert all(g.passed for g in gates.values())


# ---------------------------------------------------------------------------------------------- windows


def test_make_windows_truncates_to_max_tokens() -> None:
    w = make_windows(list(range(100)), seq_len=8, max_tokens=64)
    assert w.shape == (8, 8) and w.dtype == torch.long
    assert w.flatten().tolist() == list(range(64))


def test_make_windows_drops_the_partial_tail() -> None:
    w = make_windows(list(range(100)), seq_len=8, max_tokens=1000)
    assert w.shape == (12, 8)
    assert w[-1].tolist() == list(range(88, 96))


def test_make_windows_too_short() -> None:
    with pytest.raises(NpuflowError, match=r"has 7 tokens, fewer than one window of 8.*validation\.seq_len"):
        make_windows(list(range(7)), seq_len=8, max_tokens=64)
    with pytest.raises(NpuflowError, match="has 4 tokens"):  # max_tokens cuts below one window
        make_windows(list(range(100)), seq_len=8, max_tokens=4)


# ---------------------------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))  # (N, T)


def test_compare_model_with_itself(tiny_random_llama, windows: torch.Tensor) -> None:
    m = compare(tiny_random_llama, tiny_random_llama, windows, batch_size=2, device=torch.device("cpu"))
    assert m["ppl_delta_pct"] == pytest.approx(0.0, abs=1e-9)
    assert m["ppl_candidate"] == pytest.approx(m["ppl_reference"], rel=1e-12)
    assert m["top1_agreement"] == 1.0
    assert abs(m["kl_divergence"]) < 1e-6
    assert m["eval_tokens"] == 5 * 15  # T-1 scored positions per window
    assert 50 < m["ppl_reference"] < 300  # a random model is near uniform over 128 tokens


def test_compare_does_not_depend_on_batch_size(tiny_random_llama, windows: torch.Tensor) -> None:
    a = compare(tiny_random_llama, tiny_random_llama, windows, batch_size=1, device=torch.device("cpu"))
    b = compare(tiny_random_llama, tiny_random_llama, windows, batch_size=5, device=torch.device("cpu"))
    assert a["ppl_reference"] == pytest.approx(b["ppl_reference"], rel=1e-5)
    assert a["eval_tokens"] == b["eval_tokens"]


def test_compare_detects_a_perturbed_candidate(tiny_random_llama, windows: torch.Tensor) -> None:
    candidate = copy.deepcopy(tiny_random_llama)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in candidate.named_parameters():
            if name.endswith("proj.weight") or name == "lm_head.weight":
                p.add_(torch.randn(p.shape, generator=gen) * p.abs().mean())
    m = compare(tiny_random_llama, candidate, windows, batch_size=2, device=torch.device("cpu"))
    assert m["kl_divergence"] > 1e-3
    assert m["ppl_candidate"] != pytest.approx(m["ppl_reference"], rel=1e-3)
    assert m["ppl_delta_pct"] == pytest.approx(100 * (m["ppl_candidate"] / m["ppl_reference"] - 1))
    assert m["top1_agreement"] < 1.0
    # and the gates notice
    gates = evaluate_gates(m, GateConfig(ppl_delta_pct_max=1.0, top1_agreement_min=0.95, kl_divergence_max=1e-4))
    assert not gates["kl_divergence"].passed and not gates["top1_agreement"].passed


# ---------------------------------------------------------------------------------------------- eval text


def test_load_eval_text_file(tmp_path: Path) -> None:
    p = tmp_path / "eval.txt"
    p.write_text("the cat sat\n")
    assert load_eval_text(p.as_uri()) == "the cat sat\n"
    with pytest.raises(NpuflowError, match=r"text file .*missing\.txt does not exist"):
        load_eval_text((tmp_path / "missing.txt").as_uri())


def test_load_eval_text_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match=r"unknown text uri 'gs://b/t\.txt'; valid: builtin:tiny-corpus"):
        load_eval_text("gs://b/t.txt")
