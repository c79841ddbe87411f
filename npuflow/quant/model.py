"""quantize_model: the configured method (RTN or GPTQ) over a checkpoint, with its sensitivity report."""

from __future__ import annotations

import json
from pathlib import Path

from npuflow.core.artifacts import staging_dir
from npuflow.core.config import QuantizationConfig
from npuflow.quant.schemes import get_handler
from npuflow.quant.sensitivity import SENSITIVITY, rank_groups
from npuflow.quant.streaming import quantize_dir


def quantize_model(model_dir: Path, out_dir: Path, cfg: QuantizationConfig,
                   float_layers: frozenset[str] = frozenset(), errors: dict[str, float] | None = None) -> dict:
    """quantize_dir with the configured method and the sensitivity report (sensitivity.json).

    GPTQ calibrates layer by layer first (its per-linear errors are the report); with RTN the report is
    measured separately on the same calibration windows unless `errors` is given.
    """
    if cfg.scheme.startswith("w8a8"):  # SmoothQuant calibration, then the W8A8 weights (no sensitivity report)
        from npuflow.quant.smoothquant import quantize_w8a8

        return quantize_w8a8(model_dir, out_dir, cfg, float_layers)
    from npuflow.quant.gptq import gptq_quantize
    from npuflow.quant.sensitivity import calibration_inputs, rtn_sensitivity

    cal = cfg.calibration
    ignore = tuple(cfg.ignore) + tuple(float_layers)
    report: dict = {"method": cfg.method, "scheme": cfg.scheme, "group_size": cfg.group_size,
                    "calibration": cal.model_dump(), "float_layers": sorted(float_layers)}
    if cfg.method == "rtn":
        if cfg.sensitivity and errors is None:
            windows = calibration_inputs(model_dir, cfg)
            errors = rtn_sensitivity(model_dir, get_handler(cfg), ignore, windows)
        qm = quantize_dir(model_dir, out_dir, cfg, float_layers=float_layers)
        report["output_error"] = {k: v for k, v in (errors or {}).items() if k in qm["tensors"]
                                  and qm["tensors"][k]["quantized"]}
    else:
        windows = calibration_inputs(model_dir, cfg)  # refuses the demo corpus on another model, no tokenizer
        with staging_dir("gptq") as work:
            result = gptq_quantize(model_dir, get_handler(cfg), ignore, windows, Path(work))
            qm = quantize_dir(model_dir, out_dir, cfg, precomputed=result, float_layers=float_layers)
            report["output_error"] = {k: v["gptq_err"] for k, v in result.stats.items()}
            report["rtn_output_error"] = {k: v["rtn_err"] for k, v in result.stats.items()}
    if cfg.sensitivity or cfg.method != "rtn":
        report["ranking"] = [{"group": g, "error": e} for g, e, _ in rank_groups(report["output_error"])]
        (out_dir / SENSITIVITY).write_text(json.dumps(report, indent=2))
    return qm
