"""Contracts shared by every scanwatch service.

Events are frozen pydantic models named ``<domain>.<event>.v<N>``; a published version never
changes (``schemas/jsonschema/`` holds the snapshots that a test guards). The model signature
that training exports and the worker checks is in :mod:`schemas.model_signature`.
"""

from schemas.events import (
    EVENT_TYPES,
    DeadLetterV1,
    InferenceResultV1,
    InstanceReceivedV1,
    InstanceRef,
    StudyReadyV1,
)
from schemas.topics import TOPICS, TopicSpec, dlq

__all__ = [
    "EVENT_TYPES",
    "TOPICS",
    "DeadLetterV1",
    "InferenceResultV1",
    "InstanceReceivedV1",
    "InstanceRef",
    "StudyReadyV1",
    "TopicSpec",
    "dlq",
]
