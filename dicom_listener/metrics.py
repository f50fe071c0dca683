"""Prometheus metrics of the listener (no PHI: counts, bytes and latencies only)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets (seconds) for one fsync'd write and one acknowledged Kafka publish.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Buckets for an event's time in the outbox (Kafka may be down for minutes).
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ListenerMetrics:
    """The listener's metrics, in their own registry (one per app, so tests do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "scanwatch_listener_instances_received",
            "C-STOREs answered with success (new instances, new versions and duplicates).",
            registry=r,
        )
        self.duplicates = Counter(
            "scanwatch_listener_instances_duplicate",
            "C-STOREs of an instance already stored with the same bytes (no new event).",
            registry=r,
        )
        self.new_versions = Counter(
            "scanwatch_listener_instances_new_version",
            "C-STOREs of a known SOPInstanceUID with other bytes, kept as a new version.",
            registry=r,
        )
        self.refused = Counter(
            "scanwatch_listener_instances_refused",
            "C-STOREs answered with a failure status, by reason.",
            ["reason"],
            registry=r,
        )
        self.quarantined = Counter(
            "scanwatch_listener_instances_quarantined",
            "Refused instances whose bytes were copied to the quarantine folder.",
            registry=r,
        )
        self.procedure_steps = Counter(
            "scanwatch_listener_procedure_steps",
            "MPPS N-CREATEs and N-SETs, by command and the step's status they recorded "
            "(or refused, failed).",
            ["command", "outcome"],
            registry=r,
        )
        self.commitment_instances = Counter(
            "scanwatch_listener_commitment_instances",
            "Instances a Storage Commitment request asked about, by result (committed: stored "
            "durably; failed: reported failed with its reason).",
            ["result"],
            registry=r,
        )
        self.commitment_reports = Counter(
            "scanwatch_listener_commitment_reports_resent",
            "Storage Commitment results the sender did not take on its own association, by what "
            "became of them: delivered on a new association, or undeliverable (no address "
            "configured for the sender, or it refused every try).",
            ["outcome"],
            registry=r,
        )
        self.associations_rejected = Counter(
            "scanwatch_listener_associations_rejected",
            "Association requests rejected, by reason.",
            ["reason"],
            registry=r,
        )
        self.received_bytes = Counter(
            "scanwatch_listener_received_bytes",
            "Bytes of Part 10 files stored for successful C-STOREs.",
            registry=r,
        )
        self.store_seconds = Histogram(
            "scanwatch_listener_store_seconds",
            "Time to make one instance and its event durable (write, fsync, rename, outbox).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = Histogram(
            "scanwatch_listener_publish_seconds",
            "Time for Kafka to acknowledge one batch of events (or to fail).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_delivery_seconds = Histogram(
            "scanwatch_listener_event_delivery_seconds",
            "Time from an event's commit to the outbox to Kafka's acknowledgement.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.events_published = Counter(
            "scanwatch_listener_events_published",
            "Events acknowledged by Kafka and removed from the outbox.",
            registry=r,
        )
        self.publish_failures = Counter(
            "scanwatch_listener_publish_failures",
            "Batches of events, or watermark rounds, Kafka did not acknowledge (retried).",
            registry=r,
        )
        self.watermarks_published = Counter(
            "scanwatch_listener_watermarks_published",
            "Publication watermark rounds (one record per partition of "
            "dicom.listener.watermark.v1) acknowledged by Kafka.",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "scanwatch_listener_outbox_depth",
            "Events in the durable outbox not yet acknowledged by Kafka.",
            registry=r,
        )

    def track_outbox_depth(self, depth: Callable[[], int]) -> None:
        """Read the outbox depth at each scrape."""
        self.outbox_depth.set_function(depth)
