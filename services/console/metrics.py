"""Prometheus metrics of the console, served at ``/metrics`` (no PHI: requests are labelled by
route template, never by the UIDs in their path).

- ``console_requests_total{method, route, status}``, ``console_request_seconds{method, route}``;
- ``console_index_instances``: instances in the DICOMweb index;
- ``console_index_scan_seconds``: time of each index top-up;
- ``console_index_headers_read_total``: headers read into the index (new files, versions).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The route label of a request that matched no route.
UNMATCHED = "unmatched"


class ConsoleMetrics:
    """The console's metrics, in their own registry (one per app, so tests do not collide)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "console_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "console_request_seconds", "Request latency", ["method", "route"], registry=r
        )
        self.instances = Gauge("console_index_instances", "Instances indexed", registry=r)
        self.scan_seconds = Histogram("console_index_scan_seconds", "Index top-up time", registry=r)
        self.headers_read = Counter(
            "console_index_headers_read", "Headers read into the index", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Plain ASGI middleware that counts and times requests by route template."""

    def __init__(self, app: ASGIApp, metrics: ConsoleMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
