"""Device backends: one module per device with the same functions; BACKENDS dispatches by name."""

from __future__ import annotations

from types import ModuleType

from npuflow.core.errors import ConfigError, DeviceUnavailableError
from npuflow.runtime.backends import cpu, cuda, npu

# Each module provides:
#   NAME: str; unavailable() -> str | None (the reason, or None when usable); device() -> torch.device
#   device_name() -> str; default_dtype() -> torch.dtype; linear_w8a16(x, qweight, scale) -> Tensor
#   kernels() -> dict[str, str]; synchronize(); now_ms() -> float (after synchronising)
#   reset_peak_memory(); peak_memory_mb() -> float | None; energy_joules() -> float | None (None: no counter)
#   energy_unavailable() -> str (why not measured); versions() -> dict[str, str]
#   linear_w4a16(x, qweight, scale, zero, group_size); prepare(model, graph) -> model (fused ops, compile)
BACKENDS: dict[str, ModuleType] = {"cpu": cpu, "cuda": cuda, "npu": npu}


def get_backend(name: str) -> ModuleType:
    """The backend module for `name`, checked to be usable here (fails before any work otherwise)."""
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown device {name!r}; valid: {', '.join(BACKENDS)}") from None
    reason = backend.unavailable()
    if reason:
        raise DeviceUnavailableError(f"device {name!r} is not available here: {reason}")
    return backend
