"""Prometheus metrics of the FHIR API, served at ``/metrics`` (no PHI: requests are labelled
by route template, never by the ids in their path).

- ``fhir_api_requests_total{method, route, status}``: requests answered;
- ``fhir_api_request_seconds{method, route}``: their latency;
- ``fhir_subscription_notifications_total{outcome}``: notification attempts (delivered,
  retried, failed).

A request no route matched is labelled ``route="unmatched"``.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The route label of a request that matched no route.
UNMATCHED = "unmatched"


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


class RequestMetrics:
    """Plain ASGI middleware that counts and times requests. (Starlette's ``BaseHTTPMiddleware``
    costs a task group and memory streams per request: a measurable share of a search.)"""

    def __init__(self, app: ASGIApp, metrics: FhirApiMetrics) -> None:
        self.app = app
        self.requests = metrics.requests
        self.latency = metrics.latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees when the app fails before it answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
            self.requests.labels(scope["method"], route, str(status)).inc()


router = APIRouter()


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """The app's metrics (``request.app.state.metrics``)."""
    api_metrics: FhirApiMetrics = request.app.state.metrics
    return Response(api_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
