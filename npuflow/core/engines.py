"""Which serving engine runs which quantized deployable on which device: the one table that the config,
the convert stage and the vLLM launcher read.

npuflow's own runtime serves every scheme and format on every device. vLLM-family engines load only
what they have kernels for (shared/DESIGN.md, "Serving"): vLLM CPU has no W8A16 kernel (it runs int8 as
W8A8: compressed-tensors int-quantized, oneDNN), vLLM CUDA loads compressed-tensors W4A16, W8A16 (Marlin)
and W8A8, and vllm-ascend loads msmodelslim W8A16, W8A8 and W8A8_DYNAMIC with `--quantization ascend`
(it has no dense W4A16 method).
"""

from __future__ import annotations

ENGINES = ("npuflow", "vllm")
# (engine, device) -> the (scheme, format) pairs it can run; absent: everything
RUNS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("vllm", "cpu"): (("w4a16", "compressed-tensors"), ("w8a8", "compressed-tensors"),
                      ("w8a8-dynamic", "compressed-tensors")),
    ("vllm", "cuda"): (("w4a16", "compressed-tensors"), ("w8a16", "compressed-tensors"),
                       ("w8a8", "compressed-tensors"), ("w8a8-dynamic", "compressed-tensors")),
    ("vllm", "npu"): (("w8a16", "msmodelslim"), ("w8a8", "msmodelslim"), ("w8a8-dynamic", "msmodelslim")),
}
# (engine, device) -> arguments the engine needs to load that device's format
ENGINE_ARGS: dict[tuple[str, str], tuple[str, ...]] = {
    ("vllm", "npu"): ("--quantization", "ascend"),  # vllm-ascend's msmodelslim loader
}
# (engine, device) -> the activation dtypes it runs those kernels in; the first is what `auto` means
DTYPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("vllm", "cpu"): ("bfloat16",),  # cpu_gemm_wna16 has no float32 path; vLLM CPU has no float16
}
WHY = {
    ("vllm", "cpu"): "vLLM CPU has no W8A16 kernel; its int8 kernels are W8A8 (oneDNN)",
    ("vllm", "npu"): "vllm-ascend loads msmodelslim W8A16 / W8A8 / W8A8_DYNAMIC with --quantization ascend and has "
                     "no dense W4A16",
}


def engine_dtype(engine: str, device: str, dtype: str) -> str:
    """The dtype to convert and serve in: `auto` becomes the engine's own choice where it has one."""
    allowed = DTYPES.get((engine, device))
    return allowed[0] if allowed and dtype == "auto" else dtype


def engine_problem(engine: str, device: str, scheme: str, fmt: str, dtype: str = "auto") -> str | None:
    """Why `engine` cannot serve `scheme` weights in `fmt` on `device` in `dtype` (naming what it can), or
    None."""
    if engine not in ENGINES:
        return f"unknown serving engine {engine!r}; known: {', '.join(ENGINES)}"
    allowed = DTYPES.get((engine, device))
    if allowed and engine_dtype(engine, device, dtype) not in allowed:
        return (f"engine {engine} on {device} cannot run dtype {dtype}; it runs: convert.dtype "
                f"{' or '.join(('auto', *allowed))}")
    can = RUNS.get((engine, device))
    if can is None or (scheme, fmt) in can:
        return None
    options = " or ".join(f"quantization {{scheme: {s}, format: {f}}}" for s, f in can)
    why = WHY.get((engine, device))
    return (f"engine {engine} on {device} cannot run {scheme} in format {fmt}"
            f"{f' ({why})' if why else ''}; it runs: {options} (or use serving.engine npuflow)")


def offline_problem(scheme: str | None) -> str | None:
    """Why the offline model (prefill ONNX for ATC, runtime/offline.py) cannot be exported from `scheme`
    weights, or None. The export dequantizes the weights to float: right for a weight-only scheme, whose
    product is float; a W8A8 model also quantizes its activations, which that graph would silently drop."""
    if scheme is not None and scheme.startswith("w8a8"):
        return (f"the offline ONNX model cannot carry {scheme}: it holds float weights and no activation "
                "quantization, so it would not be the W8A8 model validated; an int8 offline model is built with "
                "Ascend AMCT. Serve W8A8 online (torch_npu npu_quant_matmul, vllm-ascend), or export a "
                "weight-only scheme (w8a16, w4a16) offline")
    return None
