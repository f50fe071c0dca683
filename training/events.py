"""Where the training service's events go: Kafka (``acks=all``) or, without a broker, nowhere.

Each event goes to the topic named by its ``SCHEMA`` (``model.published.v1``,
``training.job.status.v1``), keyed by model name or job id so that one model's or one job's
events stay in order on one partition. :meth:`KafkaEvents.send` returns only after the broker
acknowledged the event.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from schemas.events import Event

if TYPE_CHECKING:
    from kafka import KafkaProducer

logger = logging.getLogger(__name__)

#: How long a send waits for the broker's acknowledgement.
SEND_TIMEOUT_S = 15.0


class EventPublisher(Protocol):
    def send(self, event: Event, key: str, topic: str | None = None) -> None:
        """Send ``event`` to ``topic`` (default: its schema's topic) and wait for the ack."""
        ...

    def close(self) -> None: ...


class NoEvents:
    """No broker configured: events are logged at DEBUG and dropped."""

    def send(self, event: Event, key: str, topic: str | None = None) -> None:
        logger.debug("no broker configured; event not sent", extra={"schema": event.SCHEMA})

    def close(self) -> None:
        pass


class MemoryEvents:
    """Keeps events in a list (tests, dry runs)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Event]] = []

    def send(self, event: Event, key: str, topic: str | None = None) -> None:
        self.sent.append((topic or event.SCHEMA, key, event))

    def close(self) -> None:
        pass


class KafkaEvents:
    """kafka-python producer with ``acks="all"`` and idempotence; each send waits for its ack."""

    def __init__(
        self,
        bootstrap_servers: str,
        client_id: str = "scanwatch-training",
        timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._producer: KafkaProducer | None = None

    def _get(self) -> KafkaProducer:
        if self._producer is None:
            from kafka import KafkaProducer

            timeout_ms = int(self.timeout_s * 1000)
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap_servers.split(","),
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                max_block_ms=timeout_ms,
                request_timeout_ms=timeout_ms,
                delivery_timeout_ms=timeout_ms + 1000,
            )
        return self._producer

    def send(self, event: Event, key: str, topic: str | None = None) -> None:
        future = self._get().send(topic or event.SCHEMA, value=event.to_bytes(), key=key.encode())
        metadata = future.get(timeout=self.timeout_s + 1)
        logger.info(
            "event sent",
            extra={
                "schema": event.SCHEMA,
                "partition": metadata.partition,
                "offset": metadata.offset,
            },
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None


def publisher_for(bootstrap_servers: str | None) -> EventPublisher:
    return KafkaEvents(bootstrap_servers) if bootstrap_servers else NoEvents()
