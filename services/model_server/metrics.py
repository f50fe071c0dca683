"""Prometheus metrics of the model server (one registry per server, so tests stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Label used for requests naming a model this server does not serve (bounded cardinality).
UNKNOWN_MODEL = "<unknown>"


class Metrics:
    """Requests, latency, batch sizes and loaded versions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "scanwatch_model_server_requests",
            "gRPC requests answered, by method, model and gRPC status code.",
            ["method", "model_name", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "scanwatch_model_server_request_seconds",
            "Time to answer a gRPC request, by method and model.",
            ["method", "model_name"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.images = Counter(
            "scanwatch_model_server_predicted_images",
            "Images (rows of the batch dimension) answered by Predict, by model and version.",
            ["model_name", "model_version"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "scanwatch_model_server_batch_size",
            "Images per engine call (after server-side batching and padding), by model.",
            ["model_name"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.available = Gauge(
            "scanwatch_model_server_version_available",
            "1 while a model version is AVAILABLE (loaded and serving), by model, version, engine.",
            ["model_name", "model_version", "engine"],
            registry=self.registry,
        )
        self.loads = Counter(
            "scanwatch_model_server_version_loads",
            "Version loads (including warm-up), by model and outcome (ok, failed).",
            ["model_name", "outcome"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "scanwatch_model_server_version_load_seconds",
            "Time to load and warm up a version, by model.",
            ["model_name"],
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
