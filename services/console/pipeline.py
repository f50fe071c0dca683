"""Pipeline health for the operator: what came in, what is waiting, what failed.

- the listener's own health (``/healthz`` on its metrics port): its checks and the depth of its
  outbox (events stored durably, not yet acknowledged by Kafka);
- Kafka consumer lag per group and topic: the newest offset minus the group's committed one;
- dead letters: every ``<topic>.dlq`` (``schemas.topics``) read from its start, each with the
  reason the consumer gave; **re-drive** puts a letter's original message back on its source
  topic with its original key (consumers are idempotent, so a second re-drive is harmless).

Every call here blocks on the network: the web layer runs them in a thread. Kafka is reached
with librdkafka through the same settings as the rest of scanwatch (``scanwatch.kafka``).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from scanwatch import kafka
from schemas.events import DeadLetterV1
from schemas.topics import HEARTBEAT_TOPICS, TOPICS, dlq

log = logging.getLogger(__name__)

#: Every dead-letter topic scanwatch creates.
DEAD_LETTER_TOPICS: tuple[str, ...] = tuple(t.name for t in TOPICS if t.name.endswith(".dlq"))
#: Consumer groups that are readers, not pipeline stages (tests, benchmarks, the console).
_READER_PREFIXES = ("read-", "scanwatch-console")


# --- The listener -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenerHealth:
    reachable: bool
    status: str  # "ok", "unavailable" (a check failed) or "unreachable"
    checks: dict[str, str]
    outbox_depth: int | None
    kafka: str | None


def listener_health(url: str, timeout: float = 3.0) -> ListenerHealth:
    """The listener's ``/healthz`` answer (503 carries the same document)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - configured URL
            body = answer.read()
    except urllib.error.HTTPError as error:
        body = error.read()
    except (OSError, ValueError) as error:
        log.warning("listener health unreachable", extra={"error": str(error)})
        return ListenerHealth(False, "unreachable", {}, None, None)
    try:
        document: dict[str, Any] = json.loads(body)
    except ValueError:
        return ListenerHealth(True, "unreadable answer", {}, None, None)
    depth = document.get("outbox_depth")
    return ListenerHealth(
        True,
        str(document.get("status", "unknown")),
        {str(k): str(v) for k, v in (document.get("checks") or {}).items()},
        depth if isinstance(depth, int) else None,
        str(document["kafka"]) if document.get("kafka") is not None else None,
    )


# --- Consumer lag -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    group: str
    topic: str
    committed: int  # summed over partitions (a partition with no commit counts from its start)
    newest: int
    lag: int


def consumer_lag(bootstrap_servers: str, timeout: float = 10.0) -> list[Lag]:
    """Lag per (consumer group, topic) for every pipeline group that has committed offsets,
    heartbeat topics left out (:data:`schemas.topics.HEARTBEAT_TOPICS`)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    admin = AdminClient({"bootstrap.servers": bootstrap_servers}, logger=log)
    listing = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
    groups = sorted(
        g.group_id for g in listing.valid if not g.group_id.startswith(_READER_PREFIXES)
    )
    committed: dict[tuple[str, str, int], int] = {}
    for group in groups:  # the API takes one group per request
        future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
        for tp in future.result(timeout).topic_partitions or []:
            if tp.topic not in HEARTBEAT_TOPICS:
                committed[(group, tp.topic, tp.partition)] = max(tp.offset, 0)
    if not committed:
        return []
    partitions = {(topic, partition) for _, topic, partition in committed}
    ends = admin.list_offsets(
        {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions},  # type: ignore[no-untyped-call]
        request_timeout=timeout,
    )
    newest = {(tp.topic, tp.partition): f.result(timeout).offset for tp, f in ends.items()}
    totals: dict[tuple[str, str], list[int]] = {}
    for (group, topic, partition), offset in committed.items():
        total = totals.setdefault((group, topic), [0, 0])
        total[0] += offset
        total[1] += newest.get((topic, partition), offset)
    return [
        Lag(group, topic, done, end, max(0, end - done))
        for (group, topic), (done, end) in sorted(totals.items())
    ]


# --- Dead letters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """One dead letter where it lies (``topic``, ``partition``, ``offset``) and what it says."""

    topic: str
    partition: int
    offset: int
    timestamp: float  # seconds
    letter: DeadLetterV1

    @property
    def when(self) -> str:
        """When it was dead-lettered, in UTC, to the minute."""
        return datetime.fromtimestamp(self.timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")

    @property
    def ref(self) -> str:
        """Names the letter in a URL or a form: ``<topic>:<partition>:<offset>``."""
        return f"{self.topic}:{self.partition}:{self.offset}"


def dead_letters(
    bootstrap_servers: str,
    topics: tuple[str, ...] = DEAD_LETTER_TOPICS,
    newest: int = 200,
    timeout: float = 10.0,
) -> list[Letter]:
    """Up to ``newest`` letters per dead-letter topic (the latest ones), newest first. Reads
    with assigned partitions and no consumer group: nothing is committed."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "scanwatch-console-letters",  # never joined
            "enable.auto.commit": False,
        },
        logger=log,
    )
    found: list[Letter] = []
    try:
        metadata = consumer.list_topics(timeout=timeout)
        wanted: dict[tuple[str, int], int] = {}  # (topic, partition) -> end offset
        starts = []
        for topic in topics:
            if topic not in metadata.topics:
                continue
            for partition in metadata.topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout
                )
                if high > low:
                    wanted[(topic, partition)] = high
                    starts.append(TopicPartition(topic, partition, max(low, high - newest)))
        if not starts:
            return []
        consumer.assign(starts)
        while wanted:
            message = consumer.poll(timeout)
            if message is None:
                log.warning("dead letters: read stopped early", extra={"left": len(wanted)})
                break
            if message.error() is not None:
                continue
            where, part, at = message.topic(), message.partition(), message.offset()
            if where is None or part is None or at is None:
                continue
            try:
                letter = DeadLetterV1.from_bytes(message.value() or b"")
            except ValueError:
                letter = DeadLetterV1(
                    source_topic=where.removesuffix(".dlq"),
                    reason="the dead letter itself could not be read",
                    error_class="unusable",
                    payload=(message.value() or b"").decode("utf-8", "replace"),
                )
            found.append(Letter(where, part, at, message.timestamp()[1] / 1000, letter))
            if at + 1 >= wanted.get((where, part), 0):
                wanted.pop((where, part), None)
    finally:
        consumer.close()
    return sorted(found, key=lambda f: f.timestamp, reverse=True)


def find_letter(bootstrap_servers: str, ref: str, timeout: float = 10.0) -> Letter | None:
    """The letter ``ref`` names (``<topic>:<partition>:<offset>``), or None."""
    from confluent_kafka import Consumer, TopicPartition

    try:
        topic, partition_text, offset_text = ref.rsplit(":", 2)
        partition, offset = int(partition_text), int(offset_text)
    except ValueError:
        return None
    if topic not in DEAD_LETTER_TOPICS or partition < 0 or offset < 0:
        return None
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "scanwatch-console-letters",
            "enable.auto.commit": False,
        },
        logger=log,
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        message = consumer.poll(timeout)
        if message is None or message.error() is not None or message.offset() != offset:
            return None
        letter = DeadLetterV1.from_bytes(message.value() or b"")
        return Letter(topic, partition, offset, message.timestamp()[1] / 1000, letter)
    except ValueError:
        return None
    finally:
        consumer.close()


def redrive(producer: kafka.EventProducer, letter: Letter) -> tuple[int, int]:
    """Put the letter's original message back on its source topic, with its original key;
    return the (partition, offset) it got there. The source topic must be one of scanwatch's
    (a letter cannot send anything anywhere else)."""
    source = letter.letter.source_topic
    if dlq(source) != letter.topic:
        raise ValueError(f"letter on {letter.topic} names source topic {source!r}")
    key = (letter.letter.key or "").encode()
    return producer.send(source, key, letter.letter.payload.encode())
