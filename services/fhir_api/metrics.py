"""Prometheus metrics of the FHIR API, served at ``/metrics`` (no PHI: requests are labelled
by route template, never by the ids in their path).

- ``fhir_api_requests_total{method, route, status}``: requests answered;
- ``fhir_api_request_seconds{method, route}``: their latency;
- ``fhir_subscription_notifications_total{outcome}``: notification attempts (delivered,
  retried, failed).

A request no route matched is labelled ``route="unmatched"``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)


class FhirApiMetrics:
    """The API's metrics, in their own registry (one per app, so tests do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fhir_api_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fhir_api_request_seconds", "Request latency", ["method", "route"], registry=r
        )
        self.deliveries = Counter(
            "fhir_subscription_notifications",
            "Subscription notification attempts by outcome (delivered, retried, failed)",
            ["outcome"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


router = APIRouter()


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """The app's metrics (``request.app.state.metrics``)."""
    api_metrics: FhirApiMetrics = request.app.state.metrics
    return Response(api_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
