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
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from dicom_listener.adapters.outbox import Outbox
from dicom_listener.adapters.publisher import OutboxRelay
from dicom_listener.handlers import Admission
from scanwatch.http_access import HEALTH_PATH, guard_wsgi

log = logging.getLogger(__name__)


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


def http_app(
    registry: CollectorRegistry, health: HealthCheck, metrics_token: str | None, host: str
) -> Callable[..., Iterable[bytes]]:
    """``/healthz`` (open: liveness, no patient data) and ``/metrics`` (``metrics_token``'s
    bearer only; without one open on a loopback ``host``, closed elsewhere:
    ``scanwatch.http_access``)."""
    metrics_app = guard_wsgi(make_wsgi_app(registry), metrics_token, host)

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
