"""Prometheus metrics of the inference worker, served on its web port at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Circuit breaker states as the gauge reports them.
CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN = 0, 1, 2

_STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    """One registry per worker app, so that tests can build several apps in one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.studies_scored = Counter(
            "scanwatch_worker_studies_scored_total",
            "Studies scored and written to FHIR.",
            ["model_name", "model_version"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "scanwatch_worker_stage_seconds",
            "Seconds per stage of a study: assembly_wait (first instance to scoring); on the "
            "scoring path in order: header_read (each instance's file parsed once), "
            "series_choice (series, slices, the registered record built), pixels (pixel data "
            "read, decoded and resized, wall time; decode and resize: the same work's own "
            "seconds, summed over the pool's processes), preprocess (ready to model input), "
            "predict, register_wait (the registered record's write, after Predict), study_rule, "
            "heatmap_lookup (a redelivery's stored heatmaps), fhir_build, fhir_write; after "
            "the result: heatmap.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "scanwatch_worker_predict_batch_size",
            "Images per Predict call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.dead_letters = Counter(
            "scanwatch_worker_dead_letters_total",
            "Messages sent to a dead-letter topic.",
            ["topic", "error_class"],
            registry=r,
        )
        self.waiting_for_slot = Gauge(
            "scanwatch_worker_studies_waiting_for_slot",
            "Ready studies held by this worker, waiting for a scoring slot (oldest arrival "
            "first; at most studies_in_flight less scoring_concurrency).",
            registry=r,
        )
        self.step_instances_missing = Counter(
            "scanwatch_worker_step_instances_missing_total",
            "Instances a completed procedure step (MPPS) referenced that had not arrived when "
            "its study was scored at the maximum wait.",
            registry=r,
        )
        self.too_large = Counter(
            "scanwatch_worker_studies_too_large_total",
            "Studies whose ready event would pass the ready topic's record limit "
            "(schemas.topics.LARGE_RECORD_BYTES, ~35 000 instances): not announced, not scored.",
            registry=r,
        )
        self.parked = Counter(
            "scanwatch_worker_studies_parked_total",
            "Studies parked after transient failures outlasted the retries.",
            registry=r,
        )
        self.heatmaps = Counter(
            "scanwatch_worker_heatmaps_total",
            "Heatmap series of scored studies by outcome: written, present (a redelivery found "
            "them), unavailable (the model has no saliency signature), failed (the score was "
            "written without them).",
            ["outcome"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "scanwatch_worker_model_circuit_state",
            "Model server circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
