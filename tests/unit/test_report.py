"""Benchmark reports: roofline math by hand, metric names, the regression gate, and the rendered files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from npuflow.bench.plan import MODELS, kv_bytes_per_token
from npuflow.bench.report import (
    REPORT_FILES,
    is_unstable,
    metric_deltas,
    metric_suffix,
    primary,
    primary_metrics,
    regression_gate,
    render,
    roofline,
    scenario_metrics,
)
from npuflow.core.artifacts import BenchmarkReport, Scenario
from npuflow.core.names import Alias

RAPL_NOTE = ("not measured: RAPL counter /sys/class/powercap/intel-rapl:0/energy_uj is not readable "
             "on this machine")

# ---------------------------------------------------------------------------------------------- roofline


def test_mbu_and_mfu_match_a_hand_calculation() -> None:
    """Llama-2-7B, w8a16-sized weights, batch 4, prompt 512, 128 out, on an Ascend 910B1's peaks."""
    m = MODELS["llama-2-7b"]
    kv = kv_bytes_per_token(m)  # fp16 cache: 2 (K,V) x 32 layers x 32 kv heads x 128 x 2 B
    assert kv == 524_288
    r = roofline(m, batch=4, input_len=512, output_len=128, ttft_ms=200.0, tpot_ms=10.0, weight_bytes=7e9,
                 kv_bytes_per_token=kv, peak_gbs=1600.0, peak_tflops=414.0)
    # decode step k of 1..127 attends to 512 + k positions: mean 576; 4 sequences
    read = 7e9 + 4 * 524_288 * 576  # = 8_207_959_552 bytes per step
    assert r.decode_bytes_per_step == pytest.approx(8_207_959_552)
    assert r.achieved_gbs == pytest.approx(read / 0.010 / 1e9)  # 820.80 GB/s
    assert r.mbu_pct == pytest.approx(51.2997, abs=1e-3)  # 820.80 / 1600
    assert r.tpot_ms_bound == pytest.approx(5.12997, abs=1e-4)  # 8.208 GB at 1.6 TB/s
    # prefill: 2 x (6_738_415_616 params - 131_072_000 embedding) per token x 2048 tokens
    #          + causal attention 2 x 32 layers x 32 heads x 128 x 512^2 per sequence, x 4 sequences
    flops = 4 * (2 * 6_607_343_616 * 512 + 2 * 32 * 32 * 128 * 512**2)
    assert m.params == 6_738_415_616
    assert r.prefill_flops == pytest.approx(flops)
    assert r.achieved_tflops == pytest.approx(flops / 0.2 / 1e12)  # 136.7 TFLOP/s
    assert r.mfu_pct == pytest.approx(100 * flops / 0.2 / 414e12)  # 33.0 %
    assert r.mfu_pct == pytest.approx(33.02, abs=0.01)


def test_no_peak_figures_give_none_not_a_number() -> None:
    r = roofline(MODELS["llama-2-7b"], 1, 128, 32, 10.0, 5.0, 7e9, 524_288, peak_gbs=20.0, peak_tflops=None,
                 note="MFU not available: no peak FLOPS figure for a CPU")
    assert r.mfu_pct is None and r.ttft_ms_bound is None
    assert r.mbu_pct is not None and r.achieved_tflops > 0


@pytest.mark.parametrize(("stdev", "limit", "flag"), [(4.9, 5.0, False), (5.0, 5.0, False), (5.1, 5.0, True)])
def test_unstable_means_tpot_stdev_above_the_limit(stdev: float, limit: float, flag: bool) -> None:
    assert is_unstable({"p50": 1.0, "stdev_pct": stdev}, limit) is flag


# ---------------------------------------------------------------------------------------------- fixtures


def _stats(p50: float, stdev: float = 2.0) -> dict[str, float]:
    return {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50 * 1.02, "stdev_pct": stdev}


def _scenario(bs: int, inp: int, out: int, tpot: float, mode: str = "single", devices: int = 1,
              stdev: float = 2.0, energy: float | None = None) -> Scenario:
    m = MODELS["llama-2-7b"]
    ttft = 20.0 * bs
    return Scenario(
        name=f"bs{bs}_in{inp}_out{out}", batch_size=bs, input_len=inp, output_len=out, iterations=10,
        ttft_ms=_stats(ttft), tpot_ms=_stats(tpot, stdev), decode_tokens_per_s=bs * 1e3 / tpot,
        throughput_tokens_per_s=bs * out * 1e3 / (ttft + tpot * out), e2e_ms_p50=ttft + tpot * out,
        e2e_ms=_stats(ttft + tpot * out), mode=mode, devices=devices,
        unstable=is_unstable(_stats(tpot, stdev), 5.0),
        peak_memory_mb=8000.0, energy_joules=None if energy is None else 100.0, energy_tokens_per_j=energy,
        roofline=roofline(m, bs, inp, out, ttft, tpot, 7e9, 524_288, 22.5, None,
                          "MFU not available: no peak FLOPS figure for a CPU"),
    )


def _report(scenarios: list[Scenario], energy: str = RAPL_NOTE, mode: str = "single") -> BenchmarkReport:
    rep = BenchmarkReport(
        uri="file:///tmp/x", key="models/m/benchmark/x", deployable_manifest_sha256="0" * 64, device="cpu",
        device_name="Test CPU x2", scenarios=scenarios, metrics={}, peak_memory_mb=8000.0,
        model_size_mb=7000.0, energy=energy,
        roofline={"device_spec": "CPU x2", "bandwidth_gbs": 22.5, "fp16_tflops": None,
                  "source": "measured at run time", "weight_bytes": 7e9, "kv_bytes_per_token": 524_288},
        method={"model": "llama-2-7b", "mode": mode, "warmup": 2, "iterations": 10, "min_seconds": 0,
                "stability_stdev_pct_max": 5.0},
    )
    return rep.model_copy(update={"metrics": primary_metrics(primary(rep), 8000.0, 7000.0)})


# ---------------------------------------------------------------------------------------------- metric names


def test_primary_scenario_has_design_names_and_every_scenario_a_suffix() -> None:
    rep = _report([_scenario(1, 512, 128, 30.0), _scenario(4, 512, 128, 33.0),
                   _scenario(1, 512, 128, 18.0, mode="tensor-parallel", devices=2)])
    design = {"ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90", "decode_tokens_per_s",
              "throughput_tokens_per_s", "peak_memory_mb", "model_size_mb", "mbu_pct"}
    assert design <= set(rep.metrics)
    assert rep.metrics["tpot_ms_p50"] == 30.0  # the first single-mode scenario
    assert "energy_tokens_per_j" not in rep.metrics  # no counter: no number
    names = scenario_metrics(rep)
    assert names["tpot_ms_p50.bs1_in512"] == 30.0
    assert names["tpot_ms_p50.bs4_in512"] == 33.0
    assert names["tpot_ms_p50.tp2_bs1_in512"] == 18.0
    assert names["decode_tokens_per_s.bs4_in512"] == pytest.approx(4000 / 33.0)
    assert "mbu_pct.bs4_in512" in names and "tpot_stdev_pct.bs1_in512" in names


def test_primary_follows_the_measured_mode() -> None:
    rep = _report([_scenario(1, 64, 32, 3.0), _scenario(1, 64, 32, 9.0, mode="tensor-parallel", devices=2)],
                  mode="tensor-parallel")
    assert rep.metrics["tpot_ms_p50"] == 9.0


def test_suffix_carries_output_len_only_when_it_tells_scenarios_apart() -> None:
    a, b, c = _scenario(1, 512, 128, 1.0), _scenario(1, 512, 32, 1.0), _scenario(4, 512, 128, 1.0)
    assert metric_suffix(c, [a, b, c]) == "bs4_in512"
    assert metric_suffix(a, [a, b, c]) == "bs1_in512_out128"
    assert metric_suffix(b, [a, b, c]) == "bs1_in512_out32"


# ---------------------------------------------------------------------------------------------- gate


@pytest.mark.parametrize(
    ("new", "old", "passed"),
    [(10.0, 10.0, True), (10.49, 10.0, True), (10.5, 10.0, True), (10.51, 10.0, False), (7.0, 10.0, True),
     (math.nan, 10.0, False)],
    ids=["same", "within", "at-limit", "beyond", "faster", "nan"],
)
def test_regression_gate_on_tpot_p50(new: float, old: float, passed: bool) -> None:
    gate = regression_gate({"tpot_ms_p50": new}, {"tpot_ms_p50": old}, tpot_regression_pct=5.0)
    assert gate.passed is passed
    reason = gate.reasons[0]
    assert ("NaN" in reason) if math.isnan(new) else (("regressed" in reason) is (not passed))


def test_regression_gate_checks_every_shared_scenario() -> None:
    cand = {"tpot_ms_p50": 10.0, "tpot_ms_p50.bs1_in512": 10.0, "tpot_ms_p50.bs16_in512": 30.0,
            "tpot_ms_p50.bs4_in128": 1.0}
    champ = {"tpot_ms_p50": 10.0, "tpot_ms_p50.bs1_in512": 10.0, "tpot_ms_p50.bs16_in512": 20.0}
    gate = regression_gate(cand, champ, 5.0)
    assert not gate.passed
    assert set(gate.checks) == {"tpot_ms_p50", "tpot_ms_p50.bs1_in512", "tpot_ms_p50.bs16_in512"}
    assert not gate.checks["tpot_ms_p50.bs16_in512"].passed
    assert gate.checks["tpot_ms_p50.bs16_in512"].threshold == pytest.approx(21.0)
    assert "tpot_ms_p50.bs16_in512: 30 ms vs champion 20 ms (+50.0%" in gate.reasons[0]


def test_regression_gate_without_champion_or_without_candidate_numbers() -> None:
    assert regression_gate({"tpot_ms_p50": 5.0}, None).passed
    assert regression_gate({"tpot_ms_p50": 5.0}, {"ppl_candidate": 3.0}).passed  # champion never benchmarked
    missing = regression_gate({"ppl_candidate": 3.0}, {"tpot_ms_p50": 5.0})
    assert not missing.passed and "not benchmarked" in missing.reasons[0]
    assert not regression_gate({"tpot_ms_p50": 5.2}, {"tpot_ms_p50": 5.0}, tpot_regression_pct=2.0).passed


def test_metric_deltas_know_which_way_is_better() -> None:
    deltas = {d.metric: d for d in metric_deltas(
        {"tpot_ms_p50": 9.0, "decode_tokens_per_s": 90.0, "mbu_pct": 50.0, "peak_memory_mb": 10.0,
         "only_here": 1.0},
        {"tpot_ms_p50": 10.0, "decode_tokens_per_s": 100.0, "mbu_pct": 50.0, "peak_memory_mb": 8.0})}
    assert set(deltas) == {"tpot_ms_p50", "decode_tokens_per_s", "mbu_pct", "peak_memory_mb"}
    assert deltas["tpot_ms_p50"].verdict == "better"
    assert deltas["tpot_ms_p50"].delta_pct == pytest.approx(-10.0)
    assert deltas["decode_tokens_per_s"].verdict == "worse"
    assert deltas["mbu_pct"].verdict == "same"
    assert deltas["peak_memory_mb"].verdict == "worse"
    assert deltas["peak_memory_mb"].delta_pct == pytest.approx(25.0)


# ---------------------------------------------------------------------------------------------- rendering


@pytest.fixture
def report() -> BenchmarkReport:
    return _report([
        _scenario(1, 512, 128, 30.0), _scenario(4, 512, 128, 33.0, stdev=12.5),
        _scenario(16, 512, 128, 45.0), _scenario(1, 512, 128, 18.0, mode="tensor-parallel", devices=2),
    ])


def test_render_writes_markdown_html_and_plots(report: BenchmarkReport, tmp_path: Path) -> None:
    files = render(report, tmp_path / "out")
    assert [f.name for f in files] == list(REPORT_FILES)
    for f in files:
        assert f.is_file() and f.stat().st_size > 0
    for png in files[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files[0].read_text()
    for label in ("single bs1_in512_out128", "single bs4_in512_out128", "single bs16_in512_out128",
                  "TP=2 bs1_in512_out128"):
        assert md.count(f"| {label} |") == 3  # latency, throughput and roofline tables
    header = next(line for line in md.splitlines() if line.startswith("| scenario | runs |"))
    for col in ("TTFT p50", "TTFT p90", "TTFT p99", "TTFT stdev%", "TPOT p50", "TPOT p90", "TPOT p99",
                "TPOT stdev%"):
        assert f" {col} |" in header
    assert "UNSTABLE (TPOT stdev 12.5% > 5%)" in md  # bs4 only
    assert md.count("UNSTABLE") == 1
    assert f"Energy: {RAPL_NOTE}." in md and "| not measured |" in md
    assert "MFU not available: no peak FLOPS figure for a CPU" in md
    assert "Against the" not in md  # no champion given
    html = files[1].read_text()
    assert html.startswith("<!doctype html>") and html.count("<table>") == 3
    assert '<img src="roofline.png"' in html and "TP=2 bs1_in512_out128" in html


def test_render_against_a_champion_shows_deltas_and_the_gate(report: BenchmarkReport, tmp_path: Path) -> None:
    champion = {"tpot_ms_p50": 25.0, "tpot_ms_p50.bs1_in512": 25.0, "decode_tokens_per_s": 40.0}
    md = render(report, tmp_path, champion=champion, champion_label="champion v3")[0].read_text()
    assert "## Against the champion v3" in md
    assert "Regression gate (TPOT p50 at most +5%): FAIL." in md
    assert "| tpot_ms_p50 | 30 | 25 | +20.0 | worse |" in md
    assert "| decode_tokens_per_s | 33.33 | 40 | -16.7 | worse |" in md
    ok = render(report, tmp_path / "ok", champion={"tpot_ms_p50": 29.0})[0].read_text()
    assert "Regression gate (TPOT p50 at most +5%): PASS." in ok


def test_render_shows_measured_energy_and_greedy_agreement(tmp_path: Path) -> None:
    rep = _report([_scenario(1, 64, 32, 3.0, energy=12.5),
                   _scenario(1, 64, 32, 4.0, mode="tensor-parallel", devices=2, energy=9.0)],
                  energy="RAPL package counter: 200.0 J over 2 scenario runs")
    rep = rep.model_copy(update={"greedy_tokens": {"single": [[5, 6, 7]], "tensor-parallel": [[5, 6, 8]]}})
    md = render(rep, tmp_path)[0].read_text()
    assert "| 12.5 |" in md and "| 9 |" in md
    assert "not measured" not in md
    assert "| tensor-parallel | 3 | DIFFER (first at token 2) |" in md


# ---------------------------------------------------------------------------------------------- MLflow


@pytest.mark.integration
def test_pipeline_run_logs_the_report_and_the_cli_rerenders_it(npuflow_home: Path, tmp_path: Path) -> None:
    """log_pipeline_run puts report.md/.html and the plots under reports/ with every scenario's metrics;
    the second run's report compares against the champion; `npuflow report RUN_ID` renders it again."""
    import json
    import subprocess
    import sys

    from npuflow.core.artifacts import Deployable, ValidationReport
    from npuflow.core.config import parse_config
    from npuflow.core.settings import Settings
    from npuflow.registry import client as registry

    cfg = parse_config({"name": "tiny-report", "source": {"uri": "file:///nowhere"}})
    dep = Deployable(uri="file:///d", key="d", name="tiny-report", quantized_manifest_sha256="1" * 64,
                     quantized_key="q", device="cpu", device_name="Test CPU", runtime="npuflow-eager",
                     dtype="float32", kernels={}, versions={"torch": "2.13.0"}, smoke_logits_sha256="2" * 64)
    val = ValidationReport(uri="file:///v", key="v", deployable_manifest_sha256="3" * 64,
                           eval_text_sha256="4" * 64, eval_tokens=100, metrics={"ppl_candidate": 1.6},
                           gates={})
    settings = Settings()
    c = registry.client(settings.resolved_tracking_uri)
    exp = registry.experiment_id(c, cfg.name, settings.mlflow_artifact_location)
    fast = _report([_scenario(1, 64, 32, 1.0), _scenario(4, 64, 32, 1.2)])
    first = registry.log_pipeline_run(c, exp, cfg, dep, val, fast)
    names = {a.path for a in c.list_artifacts(first, "reports")}
    assert {f"reports/{n}" for n in (*REPORT_FILES, "benchmark.json")} <= names
    logged = c.get_run(first).data.metrics
    assert logged["tpot_ms_p50"] == 1.0 and logged["tpot_ms_p50.bs4_in64"] == 1.2
    assert "mbu_pct.bs1_in64" in logged
    c.create_registered_model(cfg.name)
    v1 = c.create_model_version(cfg.name, source=f"runs:/{first}/deployable", run_id=first)
    c.set_registered_model_alias(cfg.name, Alias.CHAMPION, v1.version)

    slow = _report([_scenario(1, 64, 32, 1.2), _scenario(4, 64, 32, 1.2)])  # +20% TPOT on the primary
    second = registry.log_pipeline_run(c, exp, cfg, dep, val, slow)
    md = Path(c.download_artifacts(second, "reports/report.md", str(tmp_path))).read_text()
    assert f"## Against the champion v{v1.version}" in md
    assert "Regression gate (TPOT p50 at most +5%): FAIL." in md

    proc = subprocess.run([sys.executable, "-m", "npuflow.cli", "report", second, "--output",
                           str(tmp_path / "again"), "--json"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [Path(f).name for f in out["files"]] == list(REPORT_FILES)
    assert out["regression_gate"]["passed"] is False
    assert "tpot_ms_p50: 1.2 ms vs champion 1 ms (+20.0%" in out["regression_gate"]["reasons"][0]
    assert "| single bs4_in64_out32 |" in (tmp_path / "again" / "report.md").read_text()

    missing = subprocess.run([sys.executable, "-m", "npuflow.cli", "report", "0" * 32], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert missing.returncode == 1 and "no MLflow run" in missing.stderr


def _level(c: int, tok_s: float) -> dict:
    pct = {"p50": 10.0 * c, "p90": 11.0 * c, "p99": 12.0 * c, "mean": 10.5 * c}
    return {"concurrency": c, "prompts": 8, "completed": 8, "failed": 0, "duration_s": 4.0, "requests_per_s": 2.0,
            "output_tokens_per_s": tok_s, "goodput_requests_per_s": 1.5, "ttft_ms": pct, "tpot_ms": pct,
            "itl_ms": pct, "e2el_ms": pct}


def test_the_serving_scenario_is_in_the_report_the_plot_and_the_suffixed_metrics(report, tmp_path: Path) -> None:
    served = report.model_copy(update={"serving": [_level(1, 40.0), _level(16, 150.0)],
                                       "serving_method": {"server": "npuflow serve --model m", "engine": "npuflow",
                                                          "goodput_slo_ms": {"ttft": 500.0}}})
    files = render(served, tmp_path / "out")
    assert [f.name for f in files] == [*REPORT_FILES, "serving_load.png"]
    assert files[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files[0].read_text()
    assert "## Serving under load (ms)" in md and "| 16 | 8 | 0 | 2 | 150 | 1.5 |" in md
    assert "Goodput SLOs (requests per second meeting all of them): ttft <= 500 ms." in md
    m = scenario_metrics(served)
    assert m["serve_output_tokens_per_s.c16"] == 150.0 and m["serve_ttft_ms_p99.c1"] == 12.0
    assert {"serve_itl_ms_p50.c16", "serve_itl_ms_p90.c16", "serve_tpot_ms_p99.c16",
            "serve_goodput_requests_per_s.c1", "serve_requests_per_s.c1", "serve_failed.c1"} <= set(m)
    assert not any(k.startswith("serve_") for k in scenario_metrics(report))  # no serving scenario, no names


# ---------------------------------------------------------------------------------------------- tp / pp runs


def _parallel_result(mode: str, tp: int, pp: int) -> dict:
    """What npuflow.bench.parallel.launch returns (rank 0's JSON), with made-up timings."""
    s = _scenario(1, 64, 32, 8.0, mode=mode, devices=tp * pp).model_dump(exclude={"roofline"})
    return {"mode": mode, "devices": tp * pp, "tp": tp, "pp": pp, "runtime": "npuflow-eager", "first_run_s": {},
            "scenarios": [s | {"comm_ms_per_step": 2.0, "comm_share_pct": 25.0}], "peak_memory_mb": 900.0,
            "weight_bytes": 7e9, "rank_weight_bytes": 3.6e9, "kv_bytes_per_element": 2,
            "greedy_tokens": [[1, 2, 3]], "energy_note": RAPL_NOTE,
            "ranks": [{"rank": r, "stage": r // tp, "tp_rank": r % tp, "rank_weight_bytes": 3.6e9 - r,
                       "peak_rss_mb": 1000.0 + r, "peak_memory_mb": 500.0 + r} for r in range(tp * pp)]}


def _llama_7b_dir(tmp_path: Path) -> Path:
    import json

    m = MODELS["llama-2-7b"]
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": m.layers, "hidden_size": m.hidden, "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads, "intermediate_size": m.ffn, "vocab_size": m.vocab,
        "_name_or_path": "llama-2-7b"}))
    (tmp_path / "quant_manifest.json").write_text(json.dumps({"scheme": "w8a16", "format": "native", "tensors": {}}))
    return tmp_path


@pytest.mark.parametrize(("mode", "tp", "pp"), [("tensor-parallel", 2, 1), ("pipeline-parallel", 1, 2)])
def test_a_parallel_report_has_comm_share_per_rank_memory_and_the_planner_beside_them(tmp_path, mode, tp, pp):
    from npuflow.bench.devices import DEVICES
    from npuflow.bench.plan import plan, plan_layout
    from npuflow.bench.stage import build_report
    from npuflow.core.config import BenchmarkConfig

    d, dev = _llama_7b_dir(tmp_path), DEVICES["ascend-910b2"]
    cfg = BenchmarkConfig(batch_size=1, input_len=64, output_len=32, mode=mode, tp=tp, pp=pp)
    rep = build_report([_parallel_result(mode, tp, pp)], d, "npu", "Ascend910B2", cfg, 7_000_000_000,
                       uri="file:///x", key="k", spec=(dev, ""))
    (s,) = rep.scenarios
    assert (s.comm_ms_per_step, s.comm_share_pct) == (2.0, 25.0)
    assert [r["peak_rss_mb"] for r in rep.ranks] == [1000.0, 1001.0]
    want = plan(str(d), "npu", "w8a16", 96, 1, 2, spec=dev).modes[mode]
    got = rep.planned["scenarios"]["bs1_in64_out32"]
    assert got["tpot_ms_bound"] == pytest.approx(want.tpot_ms_bound) and got["comm_ms"] == pytest.approx(want.comm_ms)
    assert want.comm_ms > 0
    layout = plan_layout(str(d), "npu", "w8a16", tp, pp, 96, 1, spec=dev)
    assert rep.planned["layout"] == layout and rep.planned["precision"] == "w8a16"
    md = (render(rep, tmp_path / "out")[0]).read_text()
    weights = f"{layout['per_device_weights_gb'] * 1e3:.4g}"
    assert f"| 0 | 0 | 0 | 3600 | {weights} | 1000 | 500 |" in md
    assert f"| {r'1 | 1 | 0' if pp == 2 else r'1 | 0 | 1'} | 3600 | {weights} | 1001 | 501 |" in md
    label = f"TP={tp * pp} bs1_in64_out32"
    row = (f"| {label} | 8 | {want.tpot_ms_bound:.4g} | {want.tpot_ms_expected[0]:.4g}-"
           f"{want.tpot_ms_expected[1]:.4g} | 2 | {want.comm_ms:.4g} | 25.0 |")
    assert row in md, md


def test_on_a_cpu_the_planner_shares_the_bandwidth_and_claims_no_communication(tmp_path):
    from npuflow.bench.devices import DeviceSpec
    from npuflow.bench.plan import plan
    from npuflow.bench.stage import build_report
    from npuflow.core.config import BenchmarkConfig

    cpu = DeviceSpec(name="CPU x2", hbm_gb=64.0, bandwidth_gbs=20.0, fp16_tflops=0.0, int8_tops=0.0, link_gbs=0.0,
                     link_latency_us=0.0, source="measured")
    d = _llama_7b_dir(tmp_path)
    cfg = BenchmarkConfig(batch_size=1, input_len=64, output_len=32, mode="tensor-parallel", tp=2)
    rep = build_report([_parallel_result("tensor-parallel", 2, 1)], d, "cpu", "Test CPU", cfg, 7_000_000_000,
                       uri="file:///x", key="k", spec=(cpu, ""))
    got = rep.planned["scenarios"]["bs1_in64_out32"]
    half = cpu.model_copy(update={"bandwidth_gbs": 10.0, "link_gbs": float("inf")})
    assert got["comm_ms"] is None
    assert got["tpot_ms_bound"] == pytest.approx(plan(str(d), "cpu", "w8a16", 96, 1, 2, spec=half)
                                                 .modes["tensor-parallel"].tpot_ms_bound)
    md = (render(rep, tmp_path / "out")[0]).read_text()
    assert "no link bandwidth figure, so no communication prediction" in md
    assert "| 2 | n/a | 25.0 |" in md  # measured comm, no planned figure, the share
