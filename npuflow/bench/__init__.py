"""Benchmarking: measurement, the stage, reports, roofline, capacity plan and device figures."""
