"""Kafka topics, their partitions, retention and replication, and their dead-letter twins."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import (
    InferenceResultV1,
    InstanceReceivedV1,
    ListenerWatermarkV1,
    ProcedureStepV1,
    StudyReadyV1,
)
from schemas.training_events import (
    ModelLifecycleCompletedV1,
    ModelLifecycleRequestedV1,
    ModelPublishedV1,
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
)

#: Partitions per topic. Study-keyed topics share it so that they stay co-partitioned.
STUDY_PARTITIONS = 4
WEEK_MS = 7 * 24 * 3600 * 1000
#: The largest record the ready topic and its dead-letter twin take (``max.message.bytes``):
#: a ready event lists every instance of its study (~0.5 KB each), and Kafka's default 1 MB
#: stopped a study of ~1 850 instances from being announced at all. 16 MiB: ~35 000 instances.
LARGE_RECORD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Replication:
    """How many brokers keep a copy of each partition (``replication.factor``), and how many
    copies must hold a write before an ``acks=all`` producer is told it is stored
    (``min.insync.replicas``; below that the broker refuses writes rather than accept them
    on too few disks)."""

    factor: int
    min_insync: int


#: Production (docker-compose's three brokers): three copies, a write acknowledged once two
#: hold it. One broker may be killed, restarted or upgraded with no acknowledged event lost and
#: producers still writing; with two down, writes stop (are refused, never half-stored).
PRODUCTION = Replication(factor=3, min_insync=2)
#: The single development broker (``make run``, the test suite's broker): one copy. It keeps
#: what it acknowledged only because it restarts from the same log folder; a lost disk loses it.
DEVELOPMENT = Replication(factor=1, min_insync=1)


def replication_for(brokers: int, configured_factor: int) -> Replication:
    """The settings topics are created with on a cluster of ``brokers`` live brokers whose
    ``default.replication.factor`` is ``configured_factor``: the production ones, except on a
    single broker configured for one copy, which is a development broker. A production cluster
    whose metadata lists one broker for a moment (the others fenced under load) is short of
    brokers, not a development one; with more than one broker but fewer than
    :data:`PRODUCTION`'s factor there is no silent downgrade either: creating a topic there
    fails (a production cluster whose brokers have not all joined yet)."""
    return DEVELOPMENT if brokers == 1 and configured_factor == 1 else PRODUCTION


@dataclass(frozen=True)
class TopicSpec:
    """A topic the project creates at start-up (its replication: :func:`replication_for`)."""

    name: str
    partitions: int = STUDY_PARTITIONS
    retention_ms: int = WEEK_MS
    #: A compacted topic keeps each key's last record for ever (a table's changelog), and
    #: ``retention_ms`` does not apply.
    compact: bool = False
    #: The topic's ``max.message.bytes``; None: the broker's default (1 MB).
    max_message_bytes: int | None = None


def dlq(topic: str) -> str:
    """The dead-letter twin of ``topic``."""
    return f"{topic}.dlq"


_STUDY_KEYED = [
    InstanceReceivedV1.SCHEMA,
    ProcedureStepV1.SCHEMA,
    StudyReadyV1.SCHEMA,
    InferenceResultV1.SCHEMA,
    ListenerWatermarkV1.SCHEMA,  # not keyed: one record per partition, by number
]
# Training traffic is small; one partition keeps a job's status events and the publications in
# order for every consumer.
_TRAINING = [
    TrainingJobRequestedV1.SCHEMA,
    TrainingJobStatusV1.SCHEMA,
    ModelPublishedV1.SCHEMA,
    ModelLifecycleRequestedV1.SCHEMA,
    ModelLifecycleCompletedV1.SCHEMA,
]

#: Watermarks matter for seconds: an hour lets a worker that restarts read the latest ones.
_RETENTION = {ListenerWatermarkV1.SCHEMA: 3600 * 1000}
#: Topics of periodic records (a listener's watermark, twice a second): a consumer is always
#: some of them behind, which is no backlog. Consumer-lag reports leave them out.
HEARTBEAT_TOPICS = frozenset({ListenerWatermarkV1.SCHEMA})
#: Topics whose records may pass Kafka's default 1 MB (:data:`LARGE_RECORD_BYTES`).
_LARGE = {StudyReadyV1.SCHEMA}

#: Every topic scanwatch uses: each event topic and its ``.dlq`` twin (longer retention, so that
#: an operator has time to look at what failed; a dead letter carries its record).
TOPICS: tuple[TopicSpec, ...] = tuple(
    spec
    for name, partitions in [(n, STUDY_PARTITIONS) for n in _STUDY_KEYED]
    + [(n, 1) for n in _TRAINING]
    for largest in [LARGE_RECORD_BYTES if name in _LARGE else None]
    for spec in (
        TopicSpec(
            name,
            partitions=partitions,
            retention_ms=_RETENTION.get(name, WEEK_MS),
            max_message_bytes=largest,
        ),
        TopicSpec(dlq(name), partitions=1, retention_ms=4 * WEEK_MS, max_message_bytes=largest),
    )
)
