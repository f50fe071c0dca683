"""Publishing events: the port the handler uses and its Kafka adapter.

:meth:`EventPublisher.publish` returns only once the event is durable on the bus and raises
otherwise, so that the caller can tell the sender the truth.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol

from schemas.events import Event

if TYPE_CHECKING:
    from kafka import KafkaProducer


class PublishError(RuntimeError):
    """The event was not acknowledged; it may or may not reach the bus later."""


class EventPublisher(Protocol):
    """Sends one event to the topic named by its ``SCHEMA`` and waits for the acknowledgement."""

    def publish(self, event: Event, key: str) -> None:
        """Return once the event is acknowledged; raise :class:`PublishError` otherwise."""
        ...

    def close(self) -> None:
        """Flush what is pending and release connections."""
        ...


class KafkaEventPublisher:
    """kafka-python producer with ``acks="all"``, waiting for each event's acknowledgement.

    The producer is created on the first :meth:`publish`, not in ``__init__``: the listener
    starts (and answers C-ECHO) while Kafka is still down, and C-STOREs fail with a DICOM
    status until Kafka answers. Every Kafka wait is bounded by ``timeout_s`` in total.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        timeout_s: float,
        client_id: str = "scanwatch-dicom-listener",
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = timeout_s
        self.client_id = client_id
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def _get_producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                from kafka import KafkaProducer

                timeout_ms = max(1, int(self.timeout_s * 1000))
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap_servers.split(","),
                    client_id=self.client_id,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=0,
                    bootstrap_timeout_ms=timeout_ms,
                    max_block_ms=timeout_ms,
                    request_timeout_ms=timeout_ms,
                    # An event not acknowledged in time has already failed its C-STORE; the
                    # sender retries, so stop retrying it here soon after.
                    delivery_timeout_ms=timeout_ms + 1000,
                )
            return self._producer

    def publish(self, event: Event, key: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            producer = self._get_producer()
            future = producer.send(event.SCHEMA, value=event.to_bytes(), key=key.encode())
            future.get(timeout=max(0.001, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - any failure means "not acknowledged"
            name = type(exc).__name__
            raise PublishError(str(exc) if name in str(exc) else f"{name}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=self.timeout_s)
                self._producer = None
