"""``/healthz`` and ``/metrics`` on one small HTTP server.

Healthy means "a C-STORE sent now would be stored": the store accepts an fsync'd write, its
disk is above the watermark, the outbox takes events and is below its limit, and the publisher
thread runs. Kafka being down is reported but is not unhealthy: instances are still stored and
their events wait in the outbox.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from dicom_listener.adapters.outbox import Outbox
from dicom_listener.adapters.publisher import OutboxRelay
from dicom_listener.handlers import Admission

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"


class HealthCheck:
    """The listener's readiness to store, as a dict of named checks."""

    def __init__(
        self, storage_dir: Path, admission: Admission, outbox: Outbox, relay: OutboxRelay
    ) -> None:
        self.storage_dir = Path(storage_dir)
        self.admission = admission
        self.outbox = outbox
        self.relay = relay
        #: Whether the publisher runs; replaced when it is a separate process.
        self.publisher_alive: Callable[[], bool] = lambda: relay.alive
        #: Kafka state as the publisher last saw it (None: unknown in this process).
        self.kafka_state: Callable[[], str | None] = lambda: (
            "ok" if relay.last_error is None else f"retrying: {relay.last_error}"
        )

    def _probe_write(self) -> None:
        folder = self.storage_dir / ".scanwatch"
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)

    def run(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, str] = {}
        ok = True

        def check(name: str, probe: Callable[[], str | None]) -> None:
            nonlocal ok
            try:
                problem = probe()
            except Exception as exc:  # noqa: BLE001 - any failure is a failed check
                problem = f"{type(exc).__name__}: {exc}"
            checks[name] = problem or "ok"
            ok = ok and problem is None

        check("storage_writable", lambda: self._probe_write())
        check(
            "disk_free",
            lambda: (
                None
                if self.admission.free_bytes() >= self.admission.min_free_bytes
                else "below watermark"
            ),
        )
        check(
            "outbox",
            lambda: None if self.outbox.depth() < self.admission.max_events else "full",
        )
        check("publisher", lambda: None if self.publisher_alive() else "publisher not running")
        info = {
            "outbox_depth": self.outbox.depth(),
            "kafka": self.kafka_state(),
        }
        return ok, {"status": "ok" if ok else "unavailable", "checks": checks, **info}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def http_app(registry: CollectorRegistry, health: HealthCheck) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == HEALTH_PATH:
            ok, body = health.run()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json")],
            )
            return [json.dumps(body).encode()]
        metrics: Iterable[bytes] = metrics_app(environ, start_response)  # untyped library
        return metrics

    return app


class HttpServer:
    """The WSGI server in a daemon thread."""

    def __init__(self, host: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        self._server = make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
