"""Prometheus metrics of the ranking service.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests, Ray replicas
sharing a worker) never collide on metric names.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Ranking latencies sit between ~1 ms (tiny history) and the timeout; finer buckets at the low end.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "muse_rank_requests", "Ranking requests by HTTP status code", ["status"], registry=self.registry
        )
        self.errors = Counter(
            "muse_rank_errors",
            "Ranking requests that failed, by reason (invalid, too_large, overloaded, timeout, internal)",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "muse_rank_latency_seconds",
            "Wall time of /rank requests that returned a ranking",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "muse_rank_stage_seconds",
            "Time per scoring stage (history, gsu, esu)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.candidates = Histogram(
            "muse_rank_candidates",
            "Candidates per ranked request",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=self.registry,
        )
        self.in_flight = Gauge("muse_rank_in_flight", "Requests being scored now", registry=self.registry)
        self.model_version = Gauge(
            "muse_model_version", "Serving model version (1 on the current one)", ["version"], registry=self.registry
        )
        self.reloads = Counter(
            "muse_model_reloads", "Model reload attempts by result (swapped, failed)", ["result"], registry=self.registry
        )
        self._version: str | None = None

    def set_model_version(self, version: str) -> None:
        if self._version is not None:
            self.model_version.remove(self._version)
        self.model_version.labels(version=version).set(1)
        self._version = version

    def observe_stages(self, timings: dict[str, float]) -> None:
        """Record a request's stage times, given in milliseconds."""
        for stage in ("history", "gsu", "esu"):
            if stage in timings:
                self.stage_latency.labels(stage=stage).observe(timings[stage] / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
