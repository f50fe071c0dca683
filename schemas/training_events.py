"""Events of the training service: job requests, job status and published models.

A client asks for a training run with :class:`TrainingJobRequestedV1` (keyed by ``job_id``); the
training worker reports each step of the job with :class:`TrainingJobStatusV1` (queued, running
with the epoch, succeeded with the held-out metrics and the version, failed with the reason); the
model lifecycle announces with :class:`ModelPublishedV1` every time a version becomes the one
served (a promotion or a rollback). An operator asks for a promotion or a rollback with
:class:`ModelLifecycleRequestedV1`; the training worker, which holds the held-out data the
promotion rule compares on, carries it out and answers with :class:`ModelLifecycleCompletedV1`
(done, refused by the rule, or failed). No pixels and no patient data: datasets are named by a path
or URI the training host can read, models by name and version.
"""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import Event

#: A SHA-256 in lower-case hex (the dataset fingerprint).
_SHA256 = r"^[0-9a-f]{64}$"
#: Plain folder name (the model repository's ``<name>``).
_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

DatasetKind = Literal["benchmark", "folder", "ham10000", "dicom"]
JobStatus = Literal["queued", "running", "succeeded", "failed"]


class DatasetSpec(BaseModel):
    """Which data a job trains on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: DatasetKind = Field(
        description="'benchmark' (bundled MNI152 synthetic benchmark), 'folder' (one folder per "
        "class), 'ham10000' (images + metadata CSV) or 'dicom' (DICOM files + labels CSV)."
    )
    path: str | None = Field(
        default=None, description="Dataset root on the training host (not for 'benchmark')."
    )
    preset: Literal["default", "large", "tiny"] = Field(
        default="default", description="Benchmark size ('benchmark' only)."
    )
    image_size: int | None = Field(
        default=None, ge=32, le=1024, description="Model input size; unset: the kind's default."
    )

    @model_validator(mode="after")
    def _path(self) -> DatasetSpec:
        if self.kind != "benchmark" and not self.path:
            raise ValueError(f"dataset kind {self.kind!r} needs a path")
        return self


class TrainingJobRequestedV1(Event):
    """Someone asked for a model to be trained (and, if ``promote``, served when good enough)."""

    SCHEMA: ClassVar[str] = "training.job.requested.v1"

    job_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Names the job everywhere.")
    model_name: str = Field(pattern=_MODEL_NAME, max_length=128)
    dataset: DatasetSpec
    variant: str | None = Field(default=None, description="EfficientNet B0..B7; unset: B0.")
    epochs: int | None = Field(default=None, ge=1, le=1000, description="Unset: the default.")
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    seed: int | None = Field(default=None)
    promote: bool = Field(
        default=True,
        description="Promote the new version if its held-out macro-F1 is at least the served "
        "one's.",
    )
    requested_by: str | None = Field(
        default=None, max_length=128, description="Operator or system name (not a patient)."
    )


class TrainingJobStatusV1(Event):
    """A step of a training job. Keyed by ``job_id``: one job's statuses stay in order."""

    SCHEMA: ClassVar[str] = "training.job.status.v1"

    job_id: uuid.UUID
    model_name: str = Field(pattern=_MODEL_NAME, max_length=128)
    status: JobStatus
    model_version: int | None = Field(
        default=None, ge=1, description="The version this job writes (reserved when it starts)."
    )
    epoch: int | None = Field(default=None, ge=0, description="Completed epochs ('running').")
    epochs: int | None = Field(default=None, ge=1, description="Most epochs of the run.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="'running': the epoch's training and validation metrics; 'succeeded': the "
        "held-out (test) metrics, macro_f1 among them.",
    )
    promoted: bool | None = Field(
        default=None, description="'succeeded': whether the new version is now served."
    )
    reason: str | None = Field(
        default=None, max_length=2000, description="'failed' (why), or why it was not promoted."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingJobStatusV1:
        if self.status == "failed" and not self.reason:
            raise ValueError("a failed status needs a reason")
        if self.status == "running" and self.epoch is None:
            raise ValueError("a running status needs the epoch")
        if self.status == "succeeded" and (
            self.model_version is None or "macro_f1" not in self.metrics
        ):
            raise ValueError("a succeeded status needs model_version and metrics['macro_f1']")
        return self


class ModelPublishedV1(Event):
    """A model version became the one served (TF Serving layout, highest version folder)."""

    SCHEMA: ClassVar[str] = "model.published.v1"

    model_name: str = Field(pattern=_MODEL_NAME, max_length=128)
    model_version: int = Field(ge=1)
    action: Literal["promoted", "rolled-back"] = Field(
        description="'promoted': a new or restored version; 'rolled-back': newer versions were "
        "withdrawn and this older one is served again."
    )
    previous_version: int | None = Field(
        default=None, ge=1, description="The version served before, if any."
    )
    storage_uri: str = Field(description="file:// URI of the version folder.")
    dataset_fingerprint: str | None = Field(default=None, pattern=_SHA256)
    macro_f1: float | None = Field(default=None, ge=0, le=1, description="Held-out macro-F1.")
    class_names: list[str] = Field(min_length=2)
    threshold: float = Field(ge=0, le=1)
    job_id: uuid.UUID | None = Field(default=None, description="The training job, if any.")


LifecycleAction = Literal["promote", "rollback"]


class ModelLifecycleRequestedV1(Event):
    """An operator asks to promote a version or to roll back (keyed by ``request_id``)."""

    SCHEMA: ClassVar[str] = "model.lifecycle.requested.v1"

    request_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Names the request.")
    model_name: str = Field(pattern=_MODEL_NAME, max_length=128)
    action: LifecycleAction
    model_version: int = Field(
        ge=1,
        description="The version to serve: 'promote', a candidate (or a rejected or "
        "rolled-back one); 'rollback', an older version. Always explicit, so that a "
        "redelivered request finds it served already and does nothing twice.",
    )
    requested_by: str | None = Field(
        default=None, max_length=128, description="Who asked (a staff username; no PHI)."
    )


class ModelLifecycleCompletedV1(Event):
    """How a :class:`ModelLifecycleRequestedV1` ended (keyed by ``request_id``)."""

    SCHEMA: ClassVar[str] = "model.lifecycle.completed.v1"

    request_id: uuid.UUID
    model_name: str = Field(pattern=_MODEL_NAME, max_length=128)
    action: LifecycleAction
    outcome: Literal["done", "refused", "failed"] = Field(
        description="'done': the version is served; 'refused': the promotion rule said no "
        "(the candidate is worse on the held-out set) or the registry's lifecycle does not "
        "allow it; 'failed': an error (the reason says which)."
    )
    model_version: int | None = Field(
        default=None, ge=1, description="'done': the version now served."
    )
    previous_version: int | None = Field(
        default=None, ge=1, description="'done': the version served before, if any."
    )
    reason: str | None = Field(
        default=None, max_length=2000, description="'refused' or 'failed': why."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelLifecycleCompletedV1:
        if self.outcome == "done" and self.model_version is None:
            raise ValueError("a done outcome needs model_version")
        if self.outcome != "done" and not self.reason:
            raise ValueError(f"a {self.outcome} outcome needs a reason")
        return self


TRAINING_EVENT_TYPES: tuple[type[Event], ...] = (
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
    ModelPublishedV1,
    ModelLifecycleRequestedV1,
    ModelLifecycleCompletedV1,
)
