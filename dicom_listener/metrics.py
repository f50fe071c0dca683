"""Prometheus metrics of the listener (no PHI: counts, bytes and latencies only)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

#: Latency buckets (seconds) for one fsync'd write and one acknowledged Kafka publish.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ListenerMetrics:
    """The listener's metrics, in their own registry (one per app, so tests do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.received = Counter(
            "scanwatch_listener_instances_received",
            "Instances stored and acknowledged by Kafka (C-STORE success).",
            registry=self.registry,
        )
        self.refused = Counter(
            "scanwatch_listener_instances_refused",
            "C-STOREs answered with a failure status, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "scanwatch_listener_received_bytes",
            "Bytes of Part 10 files stored for successful C-STOREs.",
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "scanwatch_listener_store_seconds",
            "Time to write one instance durably (write, fsync, rename, fsync folder).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "scanwatch_listener_publish_seconds",
            "Time from sending one event to Kafka's acknowledgement (or failure).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
