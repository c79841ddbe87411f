"""Energy from power sampling (npu-smi on Ascend): parsing, integration, and the npu backend's counter."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from npuflow.runtime.backends import npu
from npuflow.runtime.backends.power import PowerSampler, npu_smi_reader, parse_npu_smi_power

# `npu-smi info -t power -i 0 -c 0` as the Ascend driver prints it (fields padded to a colon column)
NPU_SMI_POWER = """        NPU ID                         : 0
        Chip ID                        : 0
        Power Dissipation(W)           : 93.5
"""


@pytest.mark.parametrize(("text", "watts"), [
    (NPU_SMI_POWER, 93.5),
    ("        Real-time Power(W)             : 171\n", 171.0),
    ("Error: the device id is invalid\n", None),
    ("", None),
])
def test_parse_npu_smi_power(text: str, watts: float | None) -> None:
    assert parse_npu_smi_power(text) == watts


def test_sampler_integrates_constant_power_over_time() -> None:
    t0 = time.monotonic()
    sampler = PowerSampler(lambda: 50.0, interval_s=0.02).start()
    time.sleep(0.3)
    joules, elapsed = sampler.joules(), time.monotonic() - t0
    sampler.stop()
    assert sampler.samples >= 2
    assert joules == pytest.approx(50.0 * elapsed, rel=0.1)  # energy = power x time, whatever the rate


def test_sampler_skips_failed_reads_and_never_invents_a_number() -> None:
    readings = iter([None, 10.0, None, 10.0] + [10.0] * 1000)
    sampler = PowerSampler(lambda: next(readings), interval_s=0.01).start()
    time.sleep(0.1)
    sampler.stop()
    assert sampler.joules() > 0
    dead = PowerSampler(lambda: None, interval_s=0.01).start()
    time.sleep(0.05)
    dead.stop()
    assert dead.joules() is None and dead.samples == 0


@pytest.fixture
def fake_npu_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `npu-smi` on PATH that prints the power page and records its arguments."""
    exe = tmp_path / "bin" / "npu-smi"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\ncat <<EOF\n{NPU_SMI_POWER}EOF\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_npu_smi_reader_runs_the_power_query(fake_npu_smi: Path) -> None:
    assert npu_smi_reader(3, 1)() == 93.5
    assert (fake_npu_smi / "argv").read_text().split() == ["info", "-t", "power", "-i", "3", "-c", "1"]
    assert npu_smi_reader(0, 0, exe=str(fake_npu_smi / "missing"))() is None


def test_npu_backend_energy_counter_from_npu_smi(fake_npu_smi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUFLOW_NPU_SMI_ID", "2:0")  # no torch_npu here: name the chip
    monkeypatch.setattr(npu, "_sampler", None)
    e0 = npu.energy_joules()
    time.sleep(0.3)
    e1 = npu.energy_joules()
    npu._sampler.stop()
    assert e0 is not None and e1 is not None and e1 - e0 > 0
    assert (fake_npu_smi / "argv").read_text().split()[-4:] == ["-i", "2", "-c", "0"]


def test_npu_energy_without_npu_smi_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(npu, "_sampler", None)
    assert npu.energy_joules() is None
    assert npu.energy_unavailable() == "not measured: npu-smi is not on PATH (it ships with the Ascend driver)"
