"""Per-version serving statistics from the serving process's /metrics text (pure: no HTTP, no clock)."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict

PREFIX = "npuflow_serve"  # metric names written by npuflow.serving.metrics


class Histogram(BaseModel):
    """Cumulative Prometheus buckets: upper bound (seconds, +inf last) -> observations <= bound."""

    model_config = ConfigDict(frozen=True)
    buckets: tuple[tuple[float, float], ...] = ()  # ((le, cumulative count), ...) sorted by le

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def minus(self, before: Histogram) -> Histogram:
        old = dict(before.buckets)
        return Histogram(buckets=tuple((le, n - old.get(le, 0.0)) for le, n in self.buckets))

    def quantile(self, q: float) -> float | None:
        """Like PromQL histogram_quantile: linear interpolation inside the bucket holding rank q*count.
        None without observations; the highest finite bound when the rank falls in the +Inf bucket."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower
                if n == below:
                    return le
                return lower + (le - lower) * (rank - below) / (n - below)
            lower, below = le, n
        return lower


class VersionStats(BaseModel):
    """What one model version served: requests, errors, TTFT and TPOT histograms (seconds)."""

    model_config = ConfigDict(frozen=True)
    version: str
    requests: float = 0.0  # completion requests routed to the version
    errors: float = 0.0  # of those, answered with an error
    ttft: Histogram = Histogram()  # request received -> first token, seconds
    tpot: Histogram = Histogram()  # per output token after the first, seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0

    def p95_ms(self, which: str) -> float | None:
        q = getattr(self, which).quantile(0.95)
        return None if q is None else q * 1000.0

    def minus(self, before: VersionStats | None) -> VersionStats:
        """The statistics of the interval since `before` (counters only grow while the process lives)."""
        if before is None:
            return self
        return VersionStats(version=self.version, requests=self.requests - before.requests,
                            errors=self.errors - before.errors, ttft=self.ttft.minus(before.ttft),
                            tpot=self.tpot.minus(before.tpot))


def parse_metrics(text: str, model: str) -> dict[str, VersionStats]:
    """{version: VersionStats} for one served model from Prometheus text exposition."""
    acc: dict[str, dict] = {}

    def slot(version: str) -> dict:
        return acc.setdefault(version, {"requests": 0.0, "errors": 0.0, "ttft": {}, "tpot": {}})

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = s.labels
            if labels.get("model") != model or labels.get("version") in (None, "none"):
                continue
            v = slot(labels["version"])
            if s.name == f"{PREFIX}_requests_total":
                v["requests"] += s.value
            elif s.name == f"{PREFIX}_errors_total":
                v["errors"] += s.value
            elif s.name in (f"{PREFIX}_ttft_seconds_bucket", f"{PREFIX}_tpot_seconds_bucket"):
                kind = "ttft" if "ttft" in s.name else "tpot"
                v[kind][float(labels["le"])] = s.value
    return {ver: VersionStats(version=ver, requests=d["requests"], errors=d["errors"],
                              ttft=Histogram(buckets=tuple(sorted(d["ttft"].items()))),
                              tpot=Histogram(buckets=tuple(sorted(d["tpot"].items()))))
            for ver, d in acc.items()}
