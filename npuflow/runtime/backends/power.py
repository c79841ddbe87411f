"""Energy from a power reading: sample it on a thread and integrate (trapezoids) into a joule counter.

Used where a device reports power but no energy counter: Ascend's `npu-smi info -t power -i CARD -c CHIP`
prints the chip's current draw ("Power Dissipation(W) : 93.5"; some versions "Real-time Power(W)").
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable

_POWER_LINE = re.compile(r"power[^:\n]*\(W\)\s*:\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


def parse_npu_smi_power(text: str) -> float | None:
    """Watts from `npu-smi info -t power` output; None when no power line is there."""
    m = _POWER_LINE.search(text)
    return float(m.group(1)) if m else None


def npu_smi_reader(card: int, chip: int, exe: str = "npu-smi", timeout_s: float = 5.0) -> Callable[[], float | None]:
    """A function returning the chip's power in watts now (None when npu-smi fails or prints no power)."""

    def read() -> float | None:
        try:
            out = subprocess.run([exe, "info", "-t", "power", "-i", str(card), "-c", str(chip)],
                                 capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return parse_npu_smi_power(out.stdout) if out.returncode == 0 else None

    return read


class PowerSampler:
    """A joule counter built from power samples: `joules()` is the energy since start, integrated with
    trapezoids between readings and extended at the last reading's power up to now. A reading that
    fails is skipped (the integral bridges the gap); no reading at all means no number."""

    def __init__(self, read_watts: Callable[[], float | None], interval_s: float = 0.1):
        self.read_watts, self.interval_s = read_watts, interval_s
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last: tuple[float, float] | None = None  # (time, watts) of the latest good reading
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PowerSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="npuflow-power-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        watts = self.read_watts()
        now = time.monotonic()
        if watts is None:
            return
        with self._lock:
            if self._last is not None:
                t0, w0 = self._last
                self._joules += (now - t0) * (w0 + watts) / 2
            self._last = (now, watts)
            self.samples += 1

    def joules(self) -> float | None:
        with self._lock:
            if self._last is None:
                return None
            t0, w0 = self._last
            return self._joules + (time.monotonic() - t0) * w0
