"""Contracts shared by every scanwatch service.

Events are frozen pydantic models named ``<domain>.<event>.v<N>``; a published version never
changes (``schemas/jsonschema/`` holds the snapshots that a test guards). The model signature
that training exports and the worker checks is in :mod:`schemas.model_signature`.
"""

from schemas.events import EVENT_TYPES as _PIPELINE_EVENT_TYPES
from schemas.events import (
    DeadLetterV1,
    Event,
    InferenceResultV1,
    InstanceReceivedV1,
    InstanceRef,
    ListenerWatermarkV1,
    ProcedureStepV1,
    StepInstanceRef,
    StudyReadyV1,
)
from schemas.topics import TOPICS, TopicSpec, dlq
from schemas.training_events import (
    TRAINING_EVENT_TYPES,
    ModelPublishedV1,
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
)

#: Every published event type (pipeline and training): each has a JSON Schema snapshot.
EVENT_TYPES: tuple[type[Event], ...] = _PIPELINE_EVENT_TYPES + TRAINING_EVENT_TYPES

__all__ = [
    "EVENT_TYPES",
    "TOPICS",
    "DeadLetterV1",
    "Event",
    "InferenceResultV1",
    "InstanceReceivedV1",
    "InstanceRef",
    "ListenerWatermarkV1",
    "ModelPublishedV1",
    "ProcedureStepV1",
    "StepInstanceRef",
    "StudyReadyV1",
    "TrainingJobRequestedV1",
    "TrainingJobStatusV1",
    "TopicSpec",
    "dlq",
]
