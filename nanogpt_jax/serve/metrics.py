"""The server's Prometheus metrics, in a registry of its own (no process-wide state)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; a CPU's first tokens take tenths, a GPU's milliseconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclasses.dataclass
class Metrics:
    registry: CollectorRegistry
    running: Gauge
    waiting: Gauge
    tokens: Counter
    requests: Counter
    ttft: Histogram
    itl: Histogram
    programs: Gauge

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            running=Gauge("nanogpt_requests_running", "rows decoding in a slot", registry=registry),
            waiting=Gauge(
                "nanogpt_requests_waiting", "requests waiting for a slot", registry=registry
            ),
            tokens=Counter(
                "nanogpt_generated_tokens", "completion tokens generated", registry=registry
            ),
            requests=Counter(
                "nanogpt_requests", "requests answered", ["status"], registry=registry
            ),
            ttft=Histogram(
                "nanogpt_time_to_first_token_seconds",
                "from a request's arrival to its first generated token",
                buckets=TTFT_BUCKETS,
                registry=registry,
            ),
            itl=Histogram(
                "nanogpt_inter_token_latency_seconds",
                "between consecutive tokens of a row, as delivered",
                buckets=ITL_BUCKETS,
                registry=registry,
            ),
            programs=Gauge(
                "nanogpt_compiled_programs",
                "programs compiled so far (traffic after the warm-up adds none)",
                registry=registry,
            ),
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
