"""Kafka topics, their partitions and retention, and their dead-letter twins."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import InferenceResultV1, InstanceReceivedV1, StudyReadyV1
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


@dataclass(frozen=True)
class TopicSpec:
    """A topic the project creates at start-up."""

    name: str
    partitions: int = STUDY_PARTITIONS
    retention_ms: int = WEEK_MS


def dlq(topic: str) -> str:
    """The dead-letter twin of ``topic``."""
    return f"{topic}.dlq"


_STUDY_KEYED = [InstanceReceivedV1.SCHEMA, StudyReadyV1.SCHEMA, InferenceResultV1.SCHEMA]
# Training traffic is small; one partition keeps a job's status events and the publications in
# order for every consumer.
_TRAINING = [
    TrainingJobRequestedV1.SCHEMA,
    TrainingJobStatusV1.SCHEMA,
    ModelPublishedV1.SCHEMA,
    ModelLifecycleRequestedV1.SCHEMA,
    ModelLifecycleCompletedV1.SCHEMA,
]

#: Every topic scanwatch uses: each event topic and its ``.dlq`` twin (longer retention, so that
#: an operator has time to look at what failed).
TOPICS: tuple[TopicSpec, ...] = tuple(
    spec
    for name, partitions in [(n, STUDY_PARTITIONS) for n in _STUDY_KEYED]
    + [(n, 1) for n in _TRAINING]
    for spec in (
        TopicSpec(name, partitions=partitions),
        TopicSpec(dlq(name), partitions=1, retention_ms=4 * WEEK_MS),
    )
)
