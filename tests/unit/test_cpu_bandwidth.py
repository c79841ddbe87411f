"""The CPU read bandwidth the roofline and MBU use is measured for the thread count a runtime decodes with."""

from __future__ import annotations

import torch

from npuflow.bench.devices import measure_cpu_bandwidth_gbs


def test_bandwidth_measured_for_the_given_threads_and_torch_threads_restored():
    before = torch.get_num_threads()
    gbs = measure_cpu_bandwidth_gbs(size_mb=64, repeats=2, threads=1)
    assert 0.05 < gbs < 2000  # GB/s: a real read, not a cached or zero-time one
    assert torch.get_num_threads() == before
