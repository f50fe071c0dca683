"""Kafka for scanwatch's own code: one producer configuration, one partitioner, topic creation.

Two client libraries reach the broker, each where it earns its place:

- **librdkafka** (``confluent-kafka``), here: every producer outside Faust (the listener's
  outbox relay, training's events), the training worker's consumer and topic administration.
  It builds and retries requests on its own C threads: a third of the CPU per event of
  kafka-python's pure-Python producer (bench/ingest.md).
- **aiokafka**, under Faust only (the inference worker's agents and tables): Faust is built on
  it and no other asyncio client plugs into it.

The partitioner contract: a keyed event goes to ``partition_for(key, n)``, Kafka's murmur2 of
the key bytes, as the Java clients, aiokafka's ``DefaultPartitioner`` (hence Faust) and
librdkafka's ``murmur2_random`` compute it. Study-keyed topics share one partition count
(:data:`schemas.topics.STUDY_PARTITIONS`), so a study's instance events, its ready event and
its table entry land on the same partition number whichever client wrote them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from schemas.events import Event
from schemas.topics import DEVELOPMENT, TOPICS, Replication, TopicSpec, replication_for

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

log = logging.getLogger(__name__)

#: librdkafka's name for the Java clients' key hashing (its own default is CRC32).
PARTITIONER = "murmur2_random"

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 of ``data`` (``org.apache.kafka.common.utils.Utils.murmur2``),
    as a signed int like the Java original."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of a keyed event among ``partitions``: the partitioner contract."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def producer_config(
    bootstrap_servers: str, client_id: str, timeout_s: float, **overrides: Any
) -> dict[str, Any]:
    """librdkafka settings every scanwatch producer shares: ``acks=all``, one request in
    flight (order per key kept across retries), the contract's partitioner, and every wait on
    the broker bounded by ``timeout_s`` (an event not acknowledged by then is reported failed).

    Not idempotent: an idempotent producer first needs a producer ID, and on a new broker
    (``Coordinator load in progress``) it held events for 0.5 s idle and over 2 s under load
    (bench/ingest.md). A request retried after a lost acknowledgement may write an event twice,
    which at-least-once delivery allows anyway (DESIGN §2).
    """
    timeout_ms = max(1, int(timeout_s * 1000))
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": False,
        "max.in.flight.requests.per.connection": 1,
        "partitioner": PARTITIONER,
        "socket.timeout.ms": timeout_ms,
        "message.timeout.ms": timeout_ms,
    }
    config.update(overrides)
    return config


def new_producer(
    bootstrap_servers: str, client_id: str, timeout_s: float, **overrides: Any
) -> Producer:
    """A librdkafka producer with :func:`producer_config`."""
    from confluent_kafka import Producer

    return Producer(
        producer_config(bootstrap_servers, client_id, timeout_s, **overrides), logger=log
    )


class KafkaPublishError(RuntimeError):
    """The broker did not acknowledge an event in time."""


class KafkaTopicError(RuntimeError):
    """scanwatch's topics cannot be created on this cluster as they must be."""


class EventProducer:
    """Sends one event at a time and returns once the broker acknowledged it (``acks=all``).

    For low-rate publishers (training's job status and model publications); the listener's
    relay batches through :func:`new_producer` itself. The producer is created on the first
    send, so that a service starts while Kafka is still down.
    """

    def __init__(self, bootstrap_servers: str, client_id: str, timeout_s: float) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._producer: Producer | None = None

    def send(self, topic: str, key: bytes, value: bytes) -> tuple[int, int]:
        """Send and wait for the acknowledgement; return ``(partition, offset)``.
        Raise :class:`KafkaPublishError` when it does not come within the timeout."""
        if self._producer is None:
            self._producer = new_producer(self.bootstrap_servers, self.client_id, self.timeout_s)
        outcome: list[tuple[KafkaError | None, Message]] = []
        self._producer.produce(
            topic, value=value, key=key, on_delivery=lambda err, msg: outcome.append((err, msg))
        )
        self._producer.flush(self.timeout_s + 1)
        if not outcome:
            raise KafkaPublishError(f"no acknowledgement from Kafka within {self.timeout_s:g}s")
        error, message = outcome[0]
        if error is not None:
            raise KafkaPublishError(str(error))
        return message.partition() or 0, message.offset() or 0

    def send_event(self, event: Event, key: str, topic: str | None = None) -> tuple[int, int]:
        """:meth:`send` ``event`` to ``topic`` (default: its schema's topic)."""
        return self.send(topic or event.SCHEMA, key.encode(), event.to_bytes())

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(self.timeout_s)


def new_consumer(
    bootstrap_servers: str, group_id: str, topics: Sequence[str], **overrides: Any
) -> Consumer:
    """A librdkafka consumer subscribed to ``topics``, reading from the earliest offset,
    committing only when told to."""
    from confluent_kafka import Consumer

    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    config.update(overrides)
    consumer = Consumer(config, logger=log)
    consumer.subscribe(list(topics))
    return consumer


def ensure_topics(
    bootstrap_servers: str, topics: Iterable[TopicSpec] = TOPICS, timeout_s: float = 30.0
) -> list[str]:
    """Create on any cluster the topics that do not exist yet; return the names created.
    Existing topics are left as they are. Replication: :func:`schemas.topics.replication_for`
    the cluster's broker count (production: factor 3, ``min.insync.replicas`` 2; a single
    development broker configured for one copy: 1 and 1); a cluster short of brokers is
    refused with a message."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
    from confluent_kafka.cimpl import NewTopic

    topics = list(topics)
    admin = AdminClient({"bootstrap.servers": bootstrap_servers}, logger=log)
    metadata = admin.list_topics(timeout=timeout_s)
    brokers = len(metadata.brokers)
    configured = 0  # only a lone broker's own configuration can make it a development one
    if brokers == 1:
        resource = ConfigResource(ResourceType.BROKER, str(next(iter(metadata.brokers))))
        configs = admin.describe_configs([resource])[resource].result(timeout=timeout_s)
        configured = int(configs["default.replication.factor"].value)
    replication = replication_for(brokers, configured)
    if brokers < replication.factor:
        raise KafkaTopicError(
            f"topics need {replication.factor} brokers (replication factor "
            f"{replication.factor}); the cluster at {bootstrap_servers} has {brokers}"
        )
    if replication is DEVELOPMENT:
        log.info("single broker: topics get one replica (development)")
    new = [
        NewTopic(
            t.name,
            num_partitions=t.partitions,
            replication_factor=replication.factor,
            config={
                **(
                    {"cleanup.policy": "compact"}
                    if t.compact
                    else {"retention.ms": str(t.retention_ms)}
                ),
                "min.insync.replicas": str(replication.min_insync),
                **_size_limit(t),
            },
        )
        for t in topics
        if t.name not in metadata.topics
    ]
    created = _create(admin, new, replication, timeout_s)
    _wait_for_leaders(admin, topics, timeout_s)
    _raise_size_limits(admin, [t for t in topics if t.name in metadata.topics], timeout_s)
    return created


def _size_limit(topic: TopicSpec) -> dict[str, str]:
    return (
        {}
        if topic.max_message_bytes is None
        else {"max.message.bytes": str(topic.max_message_bytes)}
    )


def _raise_size_limits(admin: AdminClient, existing: list[TopicSpec], timeout_s: float) -> None:
    """Give existing topics the record size limit their spec now has (a deployment created
    before the limit was raised would otherwise keep Kafka's 1 MB, and refuse a large study's
    ready event). Only this setting is changed, and only upwards."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    sized = [t for t in existing if t.max_message_bytes is not None]
    if not sized:
        return
    resources = [ConfigResource(ResourceType.TOPIC, t.name) for t in sized]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            described = {
                r: f.result(timeout=timeout_s) for r, f in admin.describe_configs(resources).items()
            }
            break
        except KafkaException as exc:
            # Asked of a broker that has not learnt of a topic another process just created.
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            if time.monotonic() > deadline:
                raise KafkaTopicError(f"topics' configuration not found: {exc}") from exc
            time.sleep(0.1)
    raise_to = {}
    for topic, resource in zip(sized, resources, strict=True):
        current = int(described[resource]["max.message.bytes"].value)
        if current < cast(int, topic.max_message_bytes):
            raise_to[topic.name] = topic.max_message_bytes
    if not raise_to:
        return
    alter = [
        ConfigResource(
            ResourceType.TOPIC,
            name,
            incremental_configs=[
                ConfigEntry(
                    "max.message.bytes", str(size), incremental_operation=AlterConfigOpType.SET
                )
            ],
        )
        for name, size in raise_to.items()
    ]
    for future in admin.incremental_alter_configs(alter).values():
        future.result(timeout=timeout_s)
    log.info("record size limit raised", extra={"topics": sorted(raise_to)})


def _create(
    admin: AdminClient, new: list[NewTopic], replication: Replication, timeout_s: float
) -> list[str]:
    from confluent_kafka import KafkaError, KafkaException

    if not new:
        return []
    created = []
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            code = exc.args[0].code()
            # The controller counts fewer live brokers than the one that answered the metadata
            # request (a broker just lost): refused as above, so the creation step runs again.
            if code == KafkaError.INVALID_REPLICATION_FACTOR:
                raise KafkaTopicError(
                    f"topics need {replication.factor} brokers: {exc.args[0].str()}"
                ) from exc
            # Created meanwhile by another process: that is what we wanted.
            if code != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def _wait_for_leaders(admin: AdminClient, topics: Iterable[TopicSpec], timeout_s: float) -> None:
    """Return once the metadata lists every partition of ``topics`` with a leader. A topic
    just created (here or by another process) is listed for a moment with no partitions, and
    a Faust worker reading that metadata took its table's changelog for one of 0 partitions
    and crashed (PartitionsMismatch)."""
    wanted = {t.name: t.partitions for t in topics}
    deadline = time.monotonic() + timeout_s
    while True:
        listed = admin.list_topics(timeout=timeout_s).topics
        short = {
            name: partitions
            for name, partitions in wanted.items()
            if name not in listed
            or len(listed[name].partitions) < partitions
            or any(p.leader < 0 for p in listed[name].partitions.values())
        }
        if not short:
            return
        if time.monotonic() > deadline:
            raise KafkaTopicError(
                f"topics without a leader for every partition after {timeout_s:.0f} s: "
                + ", ".join(sorted(short))
            )
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """``python -m scanwatch.kafka --bootstrap-servers HOST:PORT``: create scanwatch's topics
    on a cluster (docker-compose's ``topics`` step)."""
    parser = argparse.ArgumentParser(prog="python -m scanwatch.kafka", description=main.__doc__)
    parser.add_argument("--bootstrap-servers", required=True, help="host:port[,host:port]")
    args = parser.parse_args(argv)
    try:
        created = ensure_topics(args.bootstrap_servers)
    except KafkaTopicError as exc:  # brokers still joining: docker-compose runs it again
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(f"created {len(created)} topic(s): {', '.join(created) or '-'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
