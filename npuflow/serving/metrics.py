"""Prometheus series of one server (one registry per app), labelled by model and version; the canary
analysis reads them back (npuflow.serving.promstats), the same for every engine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from npuflow.serving.pool import ModelPool

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


TPOT_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # s per token


class ServeMetrics:
    """Prometheus series in one registry per app, labelled by model and version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        mv = ("model", "version")
        self.requests = Counter("npuflow_serve_requests", "Completion requests routed to this version", mv,
                                registry=self.registry)
        self.errors = Counter("npuflow_serve_errors", "Requests answered with an error, by error type",
                              (*mv, "type"), registry=self.registry)
        self.tokens = Counter("npuflow_serve_generated_tokens", "Completion tokens generated", mv,
                              registry=self.registry)
        self.ttft = Histogram("npuflow_serve_ttft_seconds", "Request received to first token, seconds", mv,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("npuflow_serve_tpot_seconds", "Time per output token after the first, s", mv,
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.weight = Gauge("npuflow_serve_route_weight", "Effective routing weight", (*mv, "role"),
                            registry=self.registry)

    def served(self, name: str, pool: ModelPool) -> None:
        """Create every series of the versions now served (so both show before traffic) and the weights."""
        w = pool.effective_weights()
        self.weight.clear()
        for role, lm in pool.served():
            labels = (name, lm.label)
            for m in (self.requests, self.tokens, self.ttft, self.tpot):
                m.labels(*labels)
            self.weight.labels(*labels, role).set(w[role])
