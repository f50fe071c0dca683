"""Prometheus metrics of the console, served at ``/metrics`` (no PHI: requests are labelled by
route template, never by the UIDs in their path).

- ``console_requests_total{method, route, status}``, ``console_request_seconds{method, route}``;
- ``console_index_instances``: instances in the DICOMweb index;
- ``console_index_scan_seconds``: time of each index top-up;
- ``console_index_headers_read_total``: headers read into the index (new files, versions).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
