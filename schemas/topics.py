"""Kafka topics, their partitions and retention, and their dead-letter twins."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import InferenceResultV1, InstanceReceivedV1, StudyReadyV1

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


_MAIN = [InstanceReceivedV1.SCHEMA, StudyReadyV1.SCHEMA, InferenceResultV1.SCHEMA]

#: Every topic scanwatch uses: each event topic and its ``.dlq`` twin (longer retention, so that
#: an operator has time to look at what failed).
TOPICS: tuple[TopicSpec, ...] = tuple(
    spec
    for name in _MAIN
    for spec in (TopicSpec(name), TopicSpec(dlq(name), partitions=1, retention_ms=4 * WEEK_MS))
)
