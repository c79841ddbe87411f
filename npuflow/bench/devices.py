"""Device specification table (memory, bandwidth, peak compute, links) with a source for every figure."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DeviceSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    hbm_gb: float  # device memory, GB (1e9 bytes)
    bandwidth_gbs: float  # peak memory bandwidth, GB/s
    fp16_tflops: float  # dense fp16/bf16 peak, TFLOP/s
    int8_tops: float  # dense int8 peak, TOP/s
    link_gbs: float  # per-device bandwidth to its peers for collectives (HCCS / NVLink), GB/s, one direction
    link_latency_us: float  # latency of one small all-reduce step, microseconds (typical, not a peak)
    source: str  # where the figures come from


# Ascend figures: Huawei publishes Atlas server datasheets, not per-chip tables; the per-variant numbers
# below are the ones in wide circulation (Atlas 800T/800I A2 materials and their third-party summaries).
# Check them on your hardware with `npu-smi info` and a bandwidth test before relying on a prediction.
_ASCEND_SRC = ("Huawei Atlas 800T A2 / 800I A2 (Ascend 910B) product materials as summarised by third parties; "
               "HCCS: 7 links x 56 GB/s full mesh per 8-NPU server")
DEVICES: dict[str, DeviceSpec] = {
    "ascend-910b1": DeviceSpec(name="Ascend 910B1", hbm_gb=64, bandwidth_gbs=1600, fp16_tflops=414, int8_tops=828,
                               link_gbs=392, link_latency_us=15, source=_ASCEND_SRC),
    "ascend-910b2": DeviceSpec(name="Ascend 910B2", hbm_gb=64, bandwidth_gbs=1600, fp16_tflops=376, int8_tops=752,
                               link_gbs=392, link_latency_us=15, source=_ASCEND_SRC),
    "ascend-910b3": DeviceSpec(name="Ascend 910B3", hbm_gb=64, bandwidth_gbs=1600, fp16_tflops=313, int8_tops=626,
                               link_gbs=392, link_latency_us=15, source=_ASCEND_SRC),
    "ascend-910b4": DeviceSpec(name="Ascend 910B4", hbm_gb=32, bandwidth_gbs=800, fp16_tflops=280, int8_tops=560,
                               link_gbs=392, link_latency_us=15, source=_ASCEND_SRC),
    "a100-80g": DeviceSpec(name="NVIDIA A100 80GB SXM", hbm_gb=80, bandwidth_gbs=2039, fp16_tflops=312,
                           int8_tops=624, link_gbs=300, link_latency_us=8,
                           source="NVIDIA A100 Tensor Core GPU datasheet (dense figures; NVLink 600 GB/s bidirectional)"),
    "h100-sxm": DeviceSpec(name="NVIDIA H100 SXM5 80GB", hbm_gb=80, bandwidth_gbs=3350, fp16_tflops=989,
                           int8_tops=1979, link_gbs=450, link_latency_us=6,
                           source="NVIDIA H100 Tensor Core GPU datasheet (dense; NVLink 900 GB/s bidirectional)"),
    "h200": DeviceSpec(name="NVIDIA H200 SXM 141GB", hbm_gb=141, bandwidth_gbs=4800, fp16_tflops=989,
                       int8_tops=1979, link_gbs=450, link_latency_us=6,
                       source="NVIDIA H200 Tensor Core GPU datasheet (dense; NVLink 900 GB/s bidirectional)"),
}


def get_device(name: str) -> DeviceSpec:
    from npuflow.core.errors import ConfigError

    if name == "cpu":
        return cpu_spec()
    try:
        return DEVICES[name]
    except KeyError:
        raise ConfigError(f"unknown device {name!r}; valid: {', '.join([*DEVICES, 'cpu'])}") from None


def measure_cpu_bandwidth_gbs(size_mb: int = 256, repeats: int = 5, threads: int | None = None) -> float:
    """Read bandwidth of this machine, GB/s (1e9 bytes/s): best of `repeats` sums over a buffer far larger than
    cache, a STREAM-like read. threads: torch intra-op threads for the read (a runtime's decode reads with its
    own thread count, and one or two cores reach well under the socket's figure); None = torch's current."""
    import time

    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
        buf.sum()  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / best / 1e9


def cpu_spec() -> DeviceSpec:
    """This CPU: bandwidth measured now; memory from /proc/meminfo; compute not claimed (0)."""
    import os

    total_kb = 0
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    return DeviceSpec(name=f"CPU x{os.cpu_count()}", hbm_gb=total_kb * 1024 / 1e9,
                      bandwidth_gbs=measure_cpu_bandwidth_gbs(), fp16_tflops=0.0, int8_tops=0.0, link_gbs=0.0,
                      link_latency_us=0.0, source="measured at run time (torch sum over 256 MB, best of 5)")
