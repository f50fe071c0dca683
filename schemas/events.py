"""Versioned event payloads carried on Kafka.

Claim check, not pixels: events carry DICOM identifiers and a storage URI, never pixel data and
never patient names or birth dates. Field names that are DICOM attributes use the DICOM keyword
verbatim (PS3.6), so ``StudyInstanceUID`` means exactly what it means in the dataset.

Every event has ``event_id`` (unique per emission, for tracing and de-duplication) and
``occurred_at`` (UTC). Each class names its own schema in ``SCHEMA``; the topic of the same name
carries it (see :mod:`schemas.topics`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

#: A DICOM UID (PS3.5 §9.1): dot-separated digit groups, at most 64 characters.
UID = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
#: An application entity title (PS3.5 §6.2): up to 16 characters, no backslash.
AETitle = Annotated[str, Field(max_length=16, pattern=r"^[^\\]*$")]
#: Lower-case hex SHA-256 of the bytes of a stored object.
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every event: frozen, strict about unknown fields, self-describing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SCHEMA: ClassVar[str]

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique per emission.")
    occurred_at: AwareDatetime = Field(default_factory=_now, description="When it happened (UTC).")

    def to_bytes(self) -> bytes:
        """The wire form: UTF-8 JSON."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Self:
        """Parse the wire form; raises ``pydantic.ValidationError`` on anything unusable."""
        return cls.model_validate_json(data)


class InstanceRef(BaseModel):
    """One stored SOP instance, as the study-level events list it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SeriesInstanceUID: UID
    SOPInstanceUID: UID
    SOPClassUID: UID
    storage_uri: str = Field(description="Where the instance's bytes are (file:// or s3://).")
    sha256: Sha256


class InstanceReceivedV1(Event):
    """A C-STORE was accepted: the instance is durable at ``storage_uri``.

    Keyed on Kafka by ``StudyInstanceUID`` so that one study's instances stay in order on one
    partition.
    """

    SCHEMA: ClassVar[str] = "dicom.instance.received.v1"

    StudyInstanceUID: UID
    SeriesInstanceUID: UID
    SOPInstanceUID: UID
    SOPClassUID: UID
    TransferSyntaxUID: UID
    Modality: str | None = Field(default=None, max_length=16)
    storage_uri: str = Field(description="Where the instance's bytes are (file:// or s3://).")
    size_bytes: int = Field(ge=0, description="Size of the stored Part 10 file in bytes.")
    sha256: Sha256
    calling_ae_title: AETitle = Field(description="The sender's AE title.")
    called_ae_title: AETitle = Field(description="The AE title the sender addressed.")

    def ref(self) -> InstanceRef:
        """This instance as a reference inside a study event."""
        return InstanceRef(
            SeriesInstanceUID=self.SeriesInstanceUID,
            SOPInstanceUID=self.SOPInstanceUID,
            SOPClassUID=self.SOPClassUID,
            storage_uri=self.storage_uri,
            sha256=self.sha256,
        )


class StepInstanceRef(BaseModel):
    """An instance a procedure step says it produced (its Performed Series Sequence)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SeriesInstanceUID: UID
    SOPInstanceUID: UID


#: Performed Procedure Step Status (0040,0252) values (PS3.3 C.4.14).
ProcedureStepStatus = Literal["IN PROGRESS", "COMPLETED", "DISCONTINUED"]


class ProcedureStepV1(Event):
    """A modality created or updated a Performed Procedure Step (MPPS, PS3.4 F.7): the scanner
    says a procedure is under way, done (and which instances it produced) or abandoned.

    One event per study the step names, keyed by ``StudyInstanceUID`` like the study's
    instance events (the same partition number). ``instances`` are every instance the step
    references; they are this study's only when ``step_studies`` names this study alone.
    """

    SCHEMA: ClassVar[str] = "dicom.procedure.step.v1"

    StudyInstanceUID: UID
    procedure_step_uid: UID = Field(description="The MPPS SOP Instance UID.")
    status: ProcedureStepStatus
    step_studies: list[UID] = Field(min_length=1, description="Every study the step names.")
    instances: list[StepInstanceRef] = Field(
        default_factory=list, description="The instances the step references, so far."
    )
    calling_ae_title: AETitle = Field(description="The modality's AE title.")


class ListenerWatermarkV1(Event):
    """A listener's publication watermark for one partition of the study-keyed topics.

    Every event the listener committed to its outbox before ``published_through`` has been
    published to Kafka and acknowledged, before this record was sent (``occurred_at``). The
    listener sends one record to each partition of this topic, co-partitioned with the
    study-keyed topics, about every half second while it can reach Kafka. A consumer that has read
    its study's partition past ``occurred_at`` has therefore read every event this listener
    accepted before ``published_through``; an event accepted but still waiting in the outbox
    (Kafka's leader for it moving, the broker restarting) holds ``published_through`` back.
    ``closing``: the listener is stopping with nothing left to publish; it sends no more.
    """

    SCHEMA: ClassVar[str] = "dicom.listener.watermark.v1"

    listener_id: str = Field(
        min_length=1,
        max_length=128,
        description="Stable per outbox: the same listener after a restart has the same id.",
    )
    published_through: AwareDatetime
    closing: bool = False


class StudyReadyV1(Event):
    """No instance of the study arrived for the quiet period: it is ready to be scored.

    A study that receives more instances after this event becomes ready again with a larger
    ``instances`` list; consumers must treat the latest as the whole study.
    """

    SCHEMA: ClassVar[str] = "dicom.study.ready.v1"

    StudyInstanceUID: UID
    instances: list[InstanceRef] = Field(min_length=1)
    first_received_at: AwareDatetime
    last_received_at: AwareDatetime
    quiet_period_s: float = Field(ge=0, description="Quiet period that made the study ready.")


class InferenceResultV1(Event):
    """A study was scored by one model version and the FHIR Observation was written.

    Results are keyed by (``StudyInstanceUID``, ``model_name``, ``model_version``): scoring the
    same study with the same model version again yields the same ``observation_id``.
    """

    SCHEMA: ClassVar[str] = "inference.result.v1"

    StudyInstanceUID: UID
    SeriesInstanceUID: UID = Field(description="The series that was scored.")
    model_name: str = Field(min_length=1)
    model_version: int = Field(ge=1)
    class_names: list[str] = Field(min_length=2)
    probabilities: list[float] = Field(min_length=2, description="Study-level, sums to 1.")
    predicted_class: str
    anomaly_score: float = Field(ge=0, le=1, description="1 - probability of the normal class.")
    threshold: float = Field(ge=0, le=1)
    slice_count: int = Field(ge=1, description="Number of images sent to the model.")
    observation_id: str = Field(description="Logical id of the FHIR Observation written.")

    @model_validator(mode="after")
    def _consistent(self) -> InferenceResultV1:
        if len(self.class_names) != len(self.probabilities):
            raise ValueError("class_names and probabilities differ in length")
        if self.predicted_class not in self.class_names:
            raise ValueError("predicted_class is not one of class_names")
        if abs(sum(self.probabilities) - 1.0) > 1e-3:
            raise ValueError("probabilities do not sum to 1")
        return self


class DeadLetterV1(Event):
    """A message that a consumer could not use, with the reason, on ``<topic>.dlq``."""

    SCHEMA: ClassVar[str] = "deadletter.v1"

    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    key: str | None = None
    reason: str = Field(description="Why it failed; no PHI.")
    error_class: str = Field(description="'unusable', 'transient-exhausted' or 'fatal'.")
    payload: str = Field(description="The original message value, as UTF-8 (or base64).")


EVENT_TYPES: tuple[type[Event], ...] = (
    InstanceReceivedV1,
    ProcedureStepV1,
    StudyReadyV1,
    InferenceResultV1,
    DeadLetterV1,
    ListenerWatermarkV1,
)
