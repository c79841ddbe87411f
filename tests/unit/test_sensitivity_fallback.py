"""Sensitivity report and `fallback: auto` on the trained demo model (real calibration, real scoring)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npuflow.core.config import GateConfig, QuantizationConfig, ValidationConfig
from npuflow.quant.fallback import quantize_with_fallback
from npuflow.quant.model import quantize_model
from npuflow.quant.sensitivity import SENSITIVITY, fused_group, rank_groups

CAL = {"samples": 8, "seq_len": 64}


def _tensors(d: Path) -> dict:
    return json.loads((d / "quant_manifest.json").read_text())["tensors"]


def test_fused_groups_are_never_split() -> None:
    assert fused_group("model.layers.3.self_attn.k_proj.weight") == (
        "model.layers.3.self_attn.qkv",
        ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"),
    )
    assert fused_group("model.layers.0.mlp.up_proj.weight")[0] == "model.layers.0.mlp.gate_up"
    ranked = rank_groups({"model.layers.0.mlp.gate_proj.weight": 0.1, "model.layers.0.mlp.up_proj.weight": 0.3,
                          "model.layers.0.mlp.down_proj.weight": 0.2})
    assert [(g, e) for g, e, _ in ranked] == [("model.layers.0.mlp.gate_up", 0.3), ("model.layers.0.mlp.down_proj", 0.2)]


def test_sensitivity_report_is_written_with_the_artifact(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    qm = quantize_model(tiny_model_dir, out, QuantizationConfig(scheme="w4a16", group_size=32, calibration=CAL,
                                                                sensitivity=True))
    report = json.loads((out / SENSITIVITY).read_text())
    quantized = {k for k, t in qm["tensors"].items() if t["quantized"]}
    assert set(report["output_error"]) == quantized  # every quantized linear, nothing else
    assert all(0 < e < 1 for e in report["output_error"].values())  # relative output error
    errs = [r["error"] for r in report["ranking"]]
    assert errs == sorted(errs, reverse=True) and len(errs) == 4 * 4 + 1  # 4 layers x 4 fused groups + lm_head
    assert "lm_head" in [r["group"] for r in report["ranking"]]  # fallback auto may keep it float


def test_fallback_keeps_the_most_sensitive_groups_float_until_the_gates_pass(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    cfg = QuantizationConfig(scheme="w4a16", group_size=32, calibration=CAL, fallback="auto", fallback_budget=16)
    # a KL gate the fully quantized model misses (its KL is ~7e-5 here): keeping layers float meets it
    strict = ValidationConfig(max_tokens=1024, gates=GateConfig(kl_divergence_max=4e-5, ppl_delta_pct_max=100,
                                                                top1_agreement_min=0.0))
    out = tmp_path / "q"
    out.mkdir()
    quantize_with_fallback(tiny_model_dir, out, cfg, strict)
    report = json.loads((out / SENSITIVITY).read_text())
    attempts = report["fallback"]["attempts"]
    assert not attempts[0]["gates_passed"] and attempts[-1]["gates_passed"]
    assert [len(a["float_groups"]) for a in attempts] == list(range(len(attempts)))
    kept = attempts[-1]["float_groups"]
    assert kept == [r["group"] for r in report["ranking"][: len(kept)]]  # most sensitive first
    tensors = _tensors(out)
    for group in kept:  # a fused group is float as a whole
        _, members = fused_group(group.replace("qkv", "q_proj").replace("gate_up", "gate_proj") + ".weight")
        assert all(not tensors[m + ".weight"]["quantized"] for m in members), group
    assert attempts[-1]["kl_divergence"] <= 4e-5 < attempts[0]["kl_divergence"]


def test_fallback_stops_at_the_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = QuantizationConfig(scheme="w4a16", group_size=32, calibration=CAL, fallback="auto", fallback_budget=1)
    impossible = ValidationConfig(max_tokens=512, gates=GateConfig(kl_divergence_max=0.0))
    out = tmp_path / "q"
    out.mkdir()
    quantize_with_fallback(tiny_model_dir, out, cfg, impossible)
    attempts = json.loads((out / SENSITIVITY).read_text())["fallback"]["attempts"]
    assert len(attempts) == 2 and not any(a["gates_passed"] for a in attempts)
    top = json.loads((out / SENSITIVITY).read_text())["ranking"][0]["group"]
    assert attempts[1]["float_groups"] == [top]  # the budget's one group is the most sensitive one


def test_fallback_needs_sensitivity() -> None:
    with pytest.raises(ValueError, match="needs sensitivity: true"):
        QuantizationConfig(fallback="auto", sensitivity=False)

