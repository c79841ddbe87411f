"""Benchmark reports: roofline math, per-scenario MLflow names, the regression gate, Markdown/HTML/PNG files.

Pure functions: numbers and reports in, numbers, decisions and files out (no device, no registry).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from npuflow.bench.plan import ModelShape, flops_per_token
from npuflow.core.artifacts import BenchmarkReport, GateResult, Roofline, Scenario

REPORT_FILES = ("report.md", "report.html", "throughput_vs_batch.png", "latency_percentiles.png",
                "roofline.png")

# ---------------------------------------------------------------------------------------------- roofline


def mean_decode_context(input_len: int, output_len: int) -> float:
    """Mean cached positions a decode step attends to: step k (1..output_len-1) reads input_len + k."""
    return input_len + output_len / 2


def decode_bytes_per_step(weight_bytes: float, kv_bytes_per_token: float, batch: int, input_len: int,
                          output_len: int) -> float:
    """Bytes one decode step must read: every weight once + each sequence's KV cache (mean context)."""
    return weight_bytes + batch * kv_bytes_per_token * mean_decode_context(input_len, output_len)


def prefill_flops(m: ModelShape, batch: int, input_len: int) -> float:
    """2 x (non-embedding) params per prompt token + causal attention (2 L H hd T^2), whole batch."""
    return batch * (flops_per_token(m, 0) * input_len + 2.0 * m.layers * m.heads * m.head_dim * input_len**2)


def roofline(m: ModelShape, batch: int, input_len: int, output_len: int, ttft_ms: float, tpot_ms: float,
             weight_bytes: float, kv_bytes_per_token: float, peak_gbs: float | None,
             peak_tflops: float | None, note: str = "") -> Roofline:
    """Decode against peak bandwidth (MBU), prefill against peak FLOP/s (MFU); None where no peak is known."""
    read = decode_bytes_per_step(weight_bytes, kv_bytes_per_token, batch, input_len, output_len)
    achieved_gbs = read / (tpot_ms / 1e3) / 1e9
    flops = prefill_flops(m, batch, input_len)
    achieved_tflops = flops / (ttft_ms / 1e3) / 1e12
    return Roofline(
        decode_bytes_per_step=read,
        tpot_ms_bound=read / (peak_gbs * 1e9) * 1e3 if peak_gbs else None,
        achieved_gbs=achieved_gbs,
        mbu_pct=100.0 * achieved_gbs / peak_gbs if peak_gbs else None,
        prefill_flops=flops,
        ttft_ms_bound=flops / (peak_tflops * 1e12) * 1e3 if peak_tflops else None,
        achieved_tflops=achieved_tflops,
        mfu_pct=100.0 * achieved_tflops / peak_tflops if peak_tflops else None,
        note=note,
    )


def is_unstable(tpot_ms: dict[str, float], stdev_pct_max: float) -> bool:
    """TPOT spread above the limit: the numbers of this scenario are not to be trusted as they are."""
    return tpot_ms["stdev_pct"] > stdev_pct_max


# ---------------------------------------------------------------------------------------------- metric names


def primary(report: BenchmarkReport) -> Scenario:
    """The scenario whose metrics carry DESIGN.md's unsuffixed names: the first of the measured mode."""
    mode = report.method.get("mode", "single")
    return next((s for s in report.scenarios if s.mode == mode), report.scenarios[0])


def metric_suffix(s: Scenario, scenarios: Iterable[Scenario]) -> str:
    """bs4_in512 (DESIGN.md); _out128 added only when another scenario differs from it in output_len alone;
    tensor-parallel scenarios start with tpN_, pipeline-parallel ones with ppN_ (N ranks)."""
    clash = any(o.mode == s.mode and (o.batch_size, o.input_len) == (s.batch_size, s.input_len)
                and o.output_len != s.output_len for o in scenarios)
    base = f"bs{s.batch_size}_in{s.input_len}" + (f"_out{s.output_len}" if clash else "")
    prefix = {"tensor-parallel": "tp", "pipeline-parallel": "pp"}.get(s.mode)  # N = all ranks of the layout
    return f"{prefix}{s.devices}_{base}" if prefix else base


def _scenario_values(s: Scenario) -> dict[str, float]:
    out = {
        "ttft_ms_p50": s.ttft_ms["p50"], "ttft_ms_p90": s.ttft_ms["p90"], "ttft_ms_p99": s.ttft_ms["p99"],
        "tpot_ms_p50": s.tpot_ms["p50"], "tpot_ms_p90": s.tpot_ms["p90"], "tpot_ms_p99": s.tpot_ms["p99"],
        "e2e_ms_p50": s.e2e_ms_p50,
        "ttft_stdev_pct": s.ttft_ms["stdev_pct"], "tpot_stdev_pct": s.tpot_ms["stdev_pct"],
        "decode_tokens_per_s": s.decode_tokens_per_s, "throughput_tokens_per_s": s.throughput_tokens_per_s,
    }
    if s.peak_memory_mb is not None:
        out["peak_memory_mb"] = s.peak_memory_mb
    if s.energy_tokens_per_j is not None:
        out["energy_tokens_per_j"] = s.energy_tokens_per_j
    if s.roofline is not None and s.roofline.mbu_pct is not None:
        out["mbu_pct"] = s.roofline.mbu_pct
    if s.roofline is not None and s.roofline.mfu_pct is not None:
        out["mfu_pct"] = s.roofline.mfu_pct
    return out


def primary_metrics(s: Scenario, peak_memory_mb: float, model_size_mb: float) -> dict[str, float]:
    """DESIGN.md names (ttft_ms_p50, tpot_ms_p50, ..., mbu_pct, energy_tokens_per_j where measured)."""
    return {**_scenario_values(s), "peak_memory_mb": peak_memory_mb, "model_size_mb": model_size_mb}


def scenario_metrics(report: BenchmarkReport) -> dict[str, float]:
    """Every scenario's variants: tpot_ms_p50.bs4_in512, decode_tokens_per_s.tp2_bs1_in64, ..., and the
    serving scenario's per concurrency level: serve_output_tokens_per_s.c16, serve_ttft_ms_p99.c16, ..."""
    from npuflow.bench.load import serving_metrics

    out: dict[str, float] = {}
    for s in report.scenarios:
        suffix = metric_suffix(s, report.scenarios)
        out |= {f"{k}.{suffix}": v for k, v in _scenario_values(s).items()}
    return out | serving_metrics(report.serving)


# ---------------------------------------------------------------------------------------------- champion


HIGHER_IS_BETTER = ("tokens_per_s", "mbu_pct", "mfu_pct", "top1_agreement", "energy_tokens_per_j")


class Delta(BaseModel):
    model_config = ConfigDict(frozen=True)
    metric: str
    candidate: float
    champion: float
    delta_pct: float | None  # (candidate - champion) / champion, %; None when the champion's value is 0
    verdict: str  # better | worse | same


def metric_deltas(candidate: dict[str, float], champion: dict[str, float],
                  names: Iterable[str] | None = None) -> list[Delta]:
    """Per-metric change against the champion for the metrics both have (or `names`), in a stable order."""
    wanted = names if names is not None else sorted(candidate)
    keys = [k for k in wanted if k in candidate and k in champion]
    out = []
    for k in keys:
        new, old = float(candidate[k]), float(champion[k])
        pct = 100.0 * (new - old) / abs(old) if old else None
        higher = k.split(".")[0].endswith(HIGHER_IS_BETTER)
        verdict = "same" if new == old else ("better" if (new > old) == higher else "worse")
        out.append(Delta(metric=k, candidate=new, champion=old, delta_pct=pct, verdict=verdict))
    return out


class RegressionGate(BaseModel):
    model_config = ConfigDict(frozen=True)
    passed: bool
    reasons: list[str]
    checks: dict[str, GateResult]  # metric -> value, limit, passed


def regression_gate(candidate: dict[str, float], champion: dict[str, float] | None,
                    tpot_regression_pct: float = 5.0) -> RegressionGate:
    """TPOT p50 (the primary and every scenario both runs measured) at most `tpot_regression_pct` % above
    the champion's. No champion, or a champion without TPOT: passes, saying so. A candidate without
    tpot_ms_p50 (not benchmarked) or with NaN fails: an unmeasured speed is not a speed."""
    new = candidate.get("tpot_ms_p50")
    if new is None or math.isnan(new):
        why = "candidate has no tpot_ms_p50: it was not benchmarked (or the value is NaN)"
        return RegressionGate(passed=False, checks={}, reasons=[why])
    if not champion or "tpot_ms_p50" not in champion:
        why = "no champion TPOT to compare against: the regression gate does not apply"
        return RegressionGate(passed=True, checks={}, reasons=[why])
    keys = ["tpot_ms_p50", *sorted(k for k in candidate if k.startswith("tpot_ms_p50.") and k in champion)]
    checks, worse, ok = {}, [], []
    for k in keys:
        value, old = float(candidate[k]), float(champion[k])
        limit = old * (1 + tpot_regression_pct / 100)
        passed = not math.isnan(value) and value <= limit
        checks[k] = GateResult(passed=passed, value=value, threshold=limit, op="<=")
        line = (f"{k}: {value:.4g} ms vs champion {old:.4g} ms ({100 * (value - old) / old:+.1f}%, "
                f"limit +{tpot_regression_pct:g}%)")
        (ok if passed else worse).append(line)
    if worse:
        why = "TPOT regressed beyond tolerance: " + "; ".join(worse)
        return RegressionGate(passed=False, checks=checks, reasons=[why, *ok])
    why = f"TPOT within +{tpot_regression_pct:g}% of the champion"
    return RegressionGate(passed=True, checks=checks, reasons=[why, *ok])


# ---------------------------------------------------------------------------------------------- rendering


def _f(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:.{digits}g}"


def _label(s: Scenario) -> str:
    return f"{'single' if s.mode == 'single' else f'TP={s.devices}'} {s.name}"


def _stability(s: Scenario, limit: float | None) -> str:
    if s.unstable:
        return f"UNSTABLE (TPOT stdev {s.tpot_ms['stdev_pct']:.1f}% > {_f(limit)}%)" if limit else "UNSTABLE"
    return "stable"


def _energy(s: Scenario, note: str) -> str:
    """tokens/J, or "not measured" (the reason is in the summary: never a made-up number)."""
    if s.energy_tokens_per_j is not None:
        return _f(s.energy_tokens_per_j)
    return "not measured" if note.startswith("not measured") else "n/a"


def _sections(report: BenchmarkReport, champion: dict[str, float] | None, champion_label: str,
              tpot_regression_pct: float) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
    """(title, paragraphs, table header, table rows) for the Markdown and HTML renderings alike."""
    m, limit = report.method, report.method.get("stability_stdev_pct_max")
    out = []
    intro = [
        f"Model: {m.get('model', '?')}; device: {report.device} ({report.device_name}); "
        f"modes: {', '.join(sorted({s.mode for s in report.scenarios}))}.",
        f"Method: fixed output length, {m.get('warmup', '?')} warm-up runs, then at least "
        f"{m.get('iterations', '?')} runs and {m.get('min_seconds', '?')} s per scenario; prefill (TTFT) and "
        "each decode step (TPOT) timed "
        f"apart with {m.get('timing', 'the backend clock')}; percentiles by linear interpolation.",
        f"Stability: a scenario whose TPOT stdev exceeds {_f(limit)}% of its mean is flagged unstable.",
        f"Energy: {report.energy}.",
    ]
    out.append(("Summary", intro, [], []))
    out.append((
        "Latency (ms)", [],
        ["scenario", "runs", "TTFT p50", "TTFT p90", "TTFT p99", "TTFT stdev%", "TPOT p50", "TPOT p90",
         "TPOT p99", "TPOT stdev%", "E2E p50", "E2E p90", "E2E p99", "stability"],
        [[_label(s), str(s.iterations), _f(s.ttft_ms["p50"]), _f(s.ttft_ms["p90"]), _f(s.ttft_ms["p99"]),
          f"{s.ttft_ms['stdev_pct']:.1f}", _f(s.tpot_ms["p50"]), _f(s.tpot_ms["p90"]), _f(s.tpot_ms["p99"]),
          f"{s.tpot_ms['stdev_pct']:.1f}", _f(s.e2e_ms.get("p50", s.e2e_ms_p50)), _f(s.e2e_ms.get("p90")),
          _f(s.e2e_ms.get("p99")), _stability(s, limit)] for s in report.scenarios],
    ))
    out.append((
        "Throughput, memory, energy",
        [f"Model size: {report.model_size_mb:.4g} MB (weight files); peak memory of the process: "
         f"{report.peak_memory_mb:.4g} MB."],
        ["scenario", "decode tokens/s", "total throughput tokens/s", "peak memory MB", "model size MB",
         "tokens/J"],
        [[_label(s), _f(s.decode_tokens_per_s), _f(s.throughput_tokens_per_s), _f(s.peak_memory_mb),
          _f(report.model_size_mb), _energy(s, report.energy)] for s in report.scenarios],
    ))
    if report.ranks or any(s.comm_share_pct is not None for s in report.scenarios):
        out += _parallel_sections(report)
    r = report.roofline
    notes = [f"Peaks: {r.get('device_spec', 'none')}: bandwidth {_f(r.get('bandwidth_gbs'))} GB/s, "
             f"{_f(r.get('fp16_tflops'))} TFLOP/s; source: {r.get('source', 'n/a')}.",
             f"Bytes per decode step = weights as loaded ({_f(r.get('weight_bytes'))} B) + batch x KV "
             f"({_f(r.get('kv_bytes_per_token'))} B/token) x mean context (input + output/2). "
             "MBU = those bytes / TPOT p50 / peak bandwidth; MFU = prefill FLOPs / TTFT p50 / peak FLOP/s."]
    notes += sorted({s.roofline.note for s in report.scenarios if s.roofline and s.roofline.note})
    out.append((
        "Roofline", notes,
        ["scenario", "bytes/step", "TPOT bound ms", "TPOT p50 ms", "achieved GB/s", "MBU %", "prefill GFLOP",
         "TTFT bound ms", "achieved TFLOP/s", "MFU %"],
        [[_label(s), _f(s.roofline.decode_bytes_per_step), _f(s.roofline.tpot_ms_bound), _f(s.tpot_ms["p50"]),
          _f(s.roofline.achieved_gbs), _f(s.roofline.mbu_pct, 3), _f(s.roofline.prefill_flops / 1e9),
          _f(s.roofline.ttft_ms_bound), _f(s.roofline.achieved_tflops, 3),
          "not available" if s.roofline.mfu_pct is None else _f(s.roofline.mfu_pct, 3)]
         for s in report.scenarios if s.roofline is not None],
    ))
    if len(report.greedy_tokens) > 1 and "single" in report.greedy_tokens:
        ref, rows = report.greedy_tokens["single"], []
        for mode, toks in report.greedy_tokens.items():
            if mode == "single":
                continue
            a, b = _flat(ref), _flat(toks)
            diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            same = diff is None and len(a) == len(b)
            rows.append([mode, str(len(b)), "identical" if same else f"DIFFER (first at token {diff})"])
        out.append(("Greedy output vs single device", ["The same prompt decoded greedily in each mode."],
                    ["mode", "tokens", "vs single"], rows))
    if report.serving:
        out.append(_serving_section(report))
    if champion is not None:
        cand = report.metrics | scenario_metrics(report)
        names = [k for k in cand if k.split(".")[0] in _COMPARED]
        deltas = metric_deltas(cand, champion, names)
        gate = regression_gate(cand, champion, tpot_regression_pct)
        out.append((
            f"Against the {champion_label}",
            [f"Regression gate (TPOT p50 at most +{tpot_regression_pct:g}%): "
             f"{'PASS' if gate.passed else 'FAIL'}.", *gate.reasons],
            ["metric", "candidate", champion_label, "delta %", "verdict"],
            [[d.metric, _f(d.candidate), _f(d.champion),
              "n/a" if d.delta_pct is None else f"{d.delta_pct:+.1f}", d.verdict] for d in deltas],
        ))
    return out


def _parallel_sections(report: BenchmarkReport) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
    """Per-rank memory (with the planner's per-device figures) and the communication share of TPOT (with the
    planner's TPOT and communication) of a tensor- or pipeline-parallel run."""
    m, plan = report.method, report.planned
    layout = plan.get("layout", {})
    out = []
    if report.ranks:
        weights_mb = [r.get("rank_weight_bytes", 0) / 1e6 for r in report.ranks]
        paras = [f"Layout: tp = {m.get('tp', '?')} x pp = {m.get('pp', '?')} ranks, each reading only its part of "
                 "the weights. Peak RSS: the rank process's resident peak (CPU: host memory); device peak: the "
                 "backend's allocator peak."]
        if layout:
            paras.append(f"Planner (bench/plan.py plan_layout, {plan.get('precision')}): "
                         f"{layout['per_device_weights_gb'] * 1e3:.4g} MB of weights and "
                         f"{layout['per_device_kv_gb'] * 1e3:.4g} MB of KV cache on the heaviest device; measured "
                         f"heaviest rank: {max(weights_mb):.4g} MB of weights.")
        out.append(("Ranks: memory per rank", paras,
                    ["rank", "stage", "tp rank", "weights MB", "planned weights MB", "peak RSS MB", "device peak MB"],
                    [[str(r.get("rank")), str(r.get("stage", 0)), str(r.get("tp_rank", r.get("rank"))), _f(w),
                      _f(layout["per_device_weights_gb"] * 1e3) if layout else "n/a", _f(r.get("peak_rss_mb")),
                      _f(r.get("peak_memory_mb"))] for r, w in zip(report.ranks, weights_mb, strict=True)]))
    rows = []
    for s in report.scenarios:
        if s.mode == "single":
            continue
        p = plan.get("scenarios", {}).get(s.name, {})
        expected = p.get("tpot_ms_expected")
        rows.append([_label(s), _f(s.tpot_ms["p50"]), _f(p.get("tpot_ms_bound")),
                     f"{_f(expected[0])}-{_f(expected[1])}" if expected else "n/a", _f(s.comm_ms_per_step),
                     _f(p.get("comm_ms")), "n/a" if s.comm_share_pct is None else f"{s.comm_share_pct:.1f}"])
    paras = ["Communication: rank 0's time inside all_reduce / all_gather / send / recv / broadcast per decode "
             "step of the timed runs (waiting for the slowest peer included; pipeline-parallel: the later stages' "
             "work too), and its share of the decode step time. Planner: bench/plan.py plan() for this mode and "
             "rank count (TPOT bound at peak bandwidth, expected at its MBU range, collective time)."]
    if plan.get("note"):
        paras.append(f"Planner note: {plan['note']}.")
    out.append(("Communication share of TPOT, against the planner", paras,
                ["scenario", "TPOT p50 ms", "planned TPOT bound ms", "planned TPOT ms", "comm ms/step",
                 "planned comm ms", "comm % of TPOT"], rows))
    return out


def _serving_section(report: BenchmarkReport) -> tuple[str, list[str], list[str], list[list[str]]]:
    m = report.serving_method
    slo = ", ".join(f"{k} <= {v:g} ms" for k, v in m.get("goodput_slo_ms", {}).items()) or "none given"
    paras = [f"The model behind the server users run ({m.get('server', 'npuflow serve')}), engine "
             f"{m.get('engine', 'npuflow')}, loaded by {m.get('tool', 'vllm bench serve')}: "
             f"{m.get('input_len', '?')} prompt tokens and {m.get('output_len', '?')} output tokens per request, "
             "one warm-up pass per level. Output tokens/s is over wall time, prefill included.",
             f"Goodput SLOs (requests per second meeting all of them): {slo}."]
    head = ["concurrency", "requests", "failed", "req/s", "output tok/s", "goodput req/s", "TTFT p50", "TTFT p99",
            "TPOT p50", "TPOT p99", "ITL p50", "ITL p90", "ITL p99"]
    rows = [[str(lv["concurrency"]), str(lv["completed"]), str(lv["failed"]), _f(lv["requests_per_s"], 3),
             _f(lv["output_tokens_per_s"], 4), "n/a" if lv["goodput_requests_per_s"] is None
             else _f(lv["goodput_requests_per_s"], 3), _f(lv["ttft_ms"]["p50"]), _f(lv["ttft_ms"]["p99"]),
             _f(lv["tpot_ms"]["p50"]), _f(lv["tpot_ms"]["p99"]), _f(lv["itl_ms"]["p50"]), _f(lv["itl_ms"]["p90"]),
             _f(lv["itl_ms"]["p99"])] for lv in report.serving]
    return "Serving under load (ms)", paras, head, rows


def _serving_plot(report: BenchmarkReport, out_dir: Path) -> str:
    """serving_load.png: output tokens/s and TTFT p99 against concurrency."""
    from matplotlib.figure import Figure

    levels = report.serving
    cs = [lv["concurrency"] for lv in levels]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(cs, [lv["output_tokens_per_s"] for lv in levels], marker="o", color="tab:blue", label="output tok/s")
    ax.set(xlabel="concurrent requests", ylabel="output tokens/s (wall time)",
           title="Served throughput and TTFT p99 against concurrency")
    if len(cs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(cs, [lv["ttft_ms"]["p99"] for lv in levels], marker="s", color="tab:red", label="TTFT p99 ms")
    right.set_ylabel("TTFT p99 ms", color="tab:red")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.9), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "serving_load.png", dpi=100)
    return "serving_load.png"


_COMPARED = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90", "decode_tokens_per_s",
             "throughput_tokens_per_s", "peak_memory_mb", "model_size_mb", "mbu_pct", "energy_tokens_per_j")


def _flat(tokens: list[list[int]]) -> list[int]:
    return [t for row in tokens for t in row]


def _markdown(title: str, sections, images: list[str]) -> str:
    lines = [f"# {title}", ""]
    for name, paras, head, rows in sections:
        lines += [f"## {name}", ""]
        lines += [*(p + "\n" for p in paras)]
        if head:
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            lines.append("")
    lines += ["## Plots", ""] + [f"![{Path(i).stem}]({i})\n" for i in images]
    return "\n".join(lines)


def _html(title: str, sections, images: list[str]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for name, paras, head, rows in sections:
        body.append(f"<h2>{e(name)}</h2>")
        body += [f"<p>{e(p)}</p>" for p in paras]
        if head:
            cells = "".join(f"<th>{e(h)}</th>" for h in head)
            body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>")
            body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</tbody></table>")
    body.append("<h2>Plots</h2>")
    body += [f'<p><img src="{e(i)}" alt="{e(Path(i).stem)}"></p>' for i in images]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _plots(report: BenchmarkReport, out_dir: Path) -> list[str]:
    """throughput_vs_batch.png, latency_percentiles.png, roofline.png (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.figure import Figure

    scen = report.scenarios
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    groups: dict[tuple, list[Scenario]] = {}
    for s in scen:
        groups.setdefault((s.mode, s.devices, s.input_len, s.output_len), []).append(s)
    for (mode, devs, i, o), ss in groups.items():
        ss = sorted(ss, key=lambda s: s.batch_size)
        ax.plot([s.batch_size for s in ss], [s.decode_tokens_per_s for s in ss], marker="o",
                label=f"{'single' if mode == 'single' else f'TP={devs}'} in{i} out{o}")
    sizes = sorted({s.batch_size for s in scen})
    if len(sizes) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set(xlabel="batch size", ylabel="decode tokens/s", title="Decode throughput vs batch size, per mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_vs_batch.png", dpi=100)

    fig = Figure(figsize=(max(7, 1.4 * len(scen)), 6.5))
    labels, width = [_label(s) for s in scen], 0.27
    for row, (key, name) in enumerate((("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"))):
        ax = fig.add_subplot(2, 1, row + 1)
        for j, q in enumerate(("p50", "p90", "p99")):
            ax.bar([x + (j - 1) * width for x in range(len(scen))], [getattr(s, key)[q] for s in scen], width,
                   label=q)
        ax.set_xticks(range(len(scen)), labels if row else [""] * len(scen), rotation=20, fontsize=7)
        ax.set(ylabel=f"{name} ms", title=f"{name} percentiles")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_percentiles.png", dpi=100)

    fig = Figure(figsize=(max(7, 1.2 * len(scen)), 4.5))
    ax = fig.add_subplot()
    xs = range(len(scen))
    ax.bar([x - 0.2 for x in xs], [s.decode_tokens_per_s for s in scen], 0.4, label="measured")
    bounds = [s.batch_size * 1e3 / s.roofline.tpot_ms_bound if s.roofline and s.roofline.tpot_ms_bound
              else 0.0 for s in scen]
    if any(bounds):
        ax.bar([x + 0.2 for x in xs], bounds, 0.4, label="roofline (peak bandwidth)", alpha=0.6)
        for x, s in zip(xs, scen, strict=True):
            if s.roofline and s.roofline.mbu_pct is not None:
                ax.annotate(f"MBU {s.roofline.mbu_pct:.0f}%", (x - 0.2, s.decode_tokens_per_s), ha="center",
                            va="bottom", fontsize=7)
        ax.set_yscale("log")
    ax.set_xticks(list(xs), [_label(s) for s in scen], rotation=20, fontsize=7)
    ax.set(ylabel="decode tokens/s", title="Measured decode throughput vs its memory-bandwidth roofline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roofline.png", dpi=100)
    images = ["throughput_vs_batch.png", "latency_percentiles.png", "roofline.png"]
    return [*images, _serving_plot(report, out_dir)] if report.serving else images


def render(report: BenchmarkReport, out_dir: Path, champion: dict[str, float] | None = None,
           champion_label: str = "champion", tpot_regression_pct: float = 5.0,
           title: str | None = None) -> list[Path]:
    """Write report.md, report.html and the PNG plots into out_dir; returns their paths (REPORT_FILES order,
    then serving_load.png when the report has a serving scenario).

    `champion`: the champion's MLflow metrics; adds per-metric deltas and the regression gate's verdict.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _plots(report, out_dir)
    title = title or f"Benchmark: {report.method.get('model', report.device_name)} on {report.device}"
    sections = _sections(report, champion, champion_label, tpot_regression_pct)
    (out_dir / "report.md").write_text(_markdown(title, sections, images))
    (out_dir / "report.html").write_text(_html(title, sections, images))
    return [out_dir / n for n in ("report.md", "report.html", *images)]  # REPORT_FILES, + serving_load.png
