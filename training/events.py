"""Where the training service's events go: Kafka (``acks=all``) or, without a broker, nowhere.

Each event goes to the topic named by its ``SCHEMA`` (``model.published.v1``,
``training.job.status.v1``), keyed by model name or job id so that one model's or one job's
events stay in order on one partition. :meth:`KafkaEvents.send` returns only after the broker
acknowledged the event.
"""

from __future__ import annotations

import logging
from typing import Protocol

from scanwatch import kafka
from schemas.events import Event

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
    """scanwatch's Kafka producer (``acks=all``); each send waits for its acknowledgement."""

    def __init__(
        self,
        bootstrap_servers: str,
        client_id: str = "scanwatch-training",
        timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self._producer = kafka.EventProducer(bootstrap_servers, client_id, timeout_s)

    def send(self, event: Event, key: str, topic: str | None = None) -> None:
        partition, offset = self._producer.send_event(event, key, topic)
        logger.info(
            "event sent", extra={"schema": event.SCHEMA, "partition": partition, "offset": offset}
        )

    def close(self) -> None:
        self._producer.close()


def publisher_for(bootstrap_servers: str | None) -> EventPublisher:
    return KafkaEvents(bootstrap_servers) if bootstrap_servers else NoEvents()
