"""The training service's event contracts (schemas/training_events.py)."""

from __future__ import annotations

import re
import uuid

import pytest
from pydantic import ValidationError

from schemas.training_events import (
    TRAINING_EVENT_TYPES,
    DatasetSpec,
    ModelPublishedV1,
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
)


@pytest.mark.parametrize("event_type", TRAINING_EVENT_TYPES, ids=lambda t: t.SCHEMA)
def test_names_are_versioned_and_carry_no_patient_fields(event_type) -> None:
    assert re.fullmatch(r"[a-z]+(\.[a-z]+)*\.v[0-9]+", event_type.SCHEMA)
    assert not {"PatientName", "PatientBirthDate", "PatientID"} & set(event_type.model_fields)


def test_job_request_round_trips() -> None:
    job = TrainingJobRequestedV1(
        model_name="brain-mri-anomaly",
        dataset=DatasetSpec(kind="folder", path="/data/brain"),
        epochs=12,
        requested_by="ops",
    )
    assert TrainingJobRequestedV1.from_bytes(job.to_bytes()) == job
    assert job.promote is True and isinstance(job.job_id, uuid.UUID)


@pytest.mark.parametrize(
    "fields",
    [
        {"dataset": {"kind": "folder"}},  # a folder needs its path
        {"dataset": {"kind": "imagenet"}},
        {"model_name": "../x", "dataset": {"kind": "benchmark"}},
        {"dataset": {"kind": "benchmark"}, "epochs": 0},
        {"dataset": {"kind": "benchmark"}, "surprise": 1},
    ],
)
def test_bad_job_requests_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        TrainingJobRequestedV1.model_validate({"model_name": "brain", **fields})


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"status": "failed"}, "reason"),
        ({"status": "running"}, "epoch"),
        ({"status": "succeeded", "model_version": 3}, "macro_f1"),
        ({"status": "succeeded", "metrics": {"macro_f1": 0.9}}, "model_version"),
        ({"status": "paused"}, "status"),
    ],
)
def test_status_events_must_be_complete(fields: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        TrainingJobStatusV1(job_id=uuid.uuid4(), model_name="brain", **fields)


def test_status_and_published_round_trip() -> None:
    done = TrainingJobStatusV1(
        job_id=uuid.uuid4(),
        model_name="brain",
        status="succeeded",
        model_version=4,
        metrics={"macro_f1": 0.97},
        promoted=True,
    )
    assert TrainingJobStatusV1.from_bytes(done.to_bytes()) == done
    published = ModelPublishedV1(
        model_name="brain",
        model_version=4,
        action="promoted",
        previous_version=3,
        storage_uri="file:///var/models/brain/4",
        dataset_fingerprint="e" * 64,
        macro_f1=0.97,
        class_names=["normal", "mass"],
        threshold=0.5,
    )
    assert ModelPublishedV1.from_bytes(published.to_bytes()) == published
    with pytest.raises(ValidationError):
        ModelPublishedV1.model_validate({**published.model_dump(), "dataset_fingerprint": "x"})
