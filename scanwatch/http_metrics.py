"""Request counts and latency of an HTTP service, by method, route template and status: plain
ASGI middleware, shared by the FHIR API and the console. (Starlette's ``BaseHTTPMiddleware``
costs a task group and memory streams per request: a measurable share of a FHIR search.)

The service owns its metrics (its own registry and names); this only fills a ``requests``
counter labelled ``method, route, status`` and a ``latency`` histogram labelled ``method,
route``. No framework import: the route template is whatever the router left in the scope.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram

#: The route label of a request that matched no route.
UNMATCHED = "unmatched"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class RequestMetrics:
    """Counts and times every HTTP request of the app it wraps."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
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
