"""Golden-file tests: published event schemas never change; events round-trip on the wire."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from pydantic import ValidationError

from schemas import EVENT_TYPES, InferenceResultV1, InstanceReceivedV1, StudyReadyV1
from schemas.export import SNAPSHOTS, json_schema

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = STUDY + ".1"
SOP = SERIES + ".1"
SHA = "ab" * 32


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.SCHEMA)
def test_published_schema_is_unchanged(event_type):
    snapshot = SNAPSHOTS / f"{event_type.SCHEMA}.json"
    assert snapshot.exists(), f"run `python -m schemas.export` to publish {event_type.SCHEMA}"
    assert json.loads(snapshot.read_text()) == json_schema(event_type), (
        f"{event_type.SCHEMA} changed; publish a new version instead"
    )


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.SCHEMA)
def test_schema_names_are_versioned(event_type):
    assert re.fullmatch(r"[a-z]+(\.[a-z]+)*\.v[0-9]+", event_type.SCHEMA)


def _received(**overrides) -> InstanceReceivedV1:
    fields = dict(
        StudyInstanceUID=STUDY,
        SeriesInstanceUID=SERIES,
        SOPInstanceUID=SOP,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
        TransferSyntaxUID="1.2.840.10008.1.2.1",
        Modality="MR",
        storage_uri="file:///store/x.dcm",
        size_bytes=10,
        sha256=SHA,
        calling_ae_title="STORESCU",
        called_ae_title="SCANWATCH",
    )
    return InstanceReceivedV1(**{**fields, **overrides})


def test_instance_event_round_trips_and_is_frozen():
    event = _received()
    again = InstanceReceivedV1.from_bytes(event.to_bytes())
    assert again == event
    with pytest.raises(ValidationError):
        event.SOPInstanceUID = "1.2"  # type: ignore[misc]


def test_events_carry_no_patient_fields():
    # Claim check: identifiers and storage URIs only, never names or birth dates.
    for event_type in EVENT_TYPES:
        assert not {"PatientName", "PatientBirthDate"} & set(event_type.model_fields)


@pytest.mark.parametrize(
    "overrides",
    [
        {"StudyInstanceUID": "not-a-uid"},
        {"sha256": "xyz"},
        {"unexpected": 1},
        {"calling_ae_title": "A" * 17},
    ],
)
def test_invalid_instance_events_are_rejected(overrides):
    with pytest.raises(ValidationError):
        _received(**overrides)


def test_study_ready_needs_instances():
    now = _received().occurred_at
    with pytest.raises(ValidationError):
        StudyReadyV1(
            StudyInstanceUID=STUDY,
            instances=[],
            first_received_at=now,
            last_received_at=now,
            quiet_period_s=1,
        )
    ready = StudyReadyV1(
        StudyInstanceUID=STUDY,
        instances=[_received().ref()],
        first_received_at=now,
        last_received_at=now,
        quiet_period_s=1,
    )
    assert StudyReadyV1.from_bytes(ready.to_bytes()).instances[0].SOPInstanceUID == SOP


def test_result_probabilities_must_be_consistent():
    good = dict(
        StudyInstanceUID=STUDY,
        SeriesInstanceUID=SERIES,
        model_name="m",
        model_version=1,
        class_names=["normal", "mass"],
        probabilities=[0.25, 0.75],
        predicted_class="mass",
        anomaly_score=0.75,
        threshold=0.5,
        slice_count=3,
        observation_id=str(uuid.uuid4()),
    )
    assert InferenceResultV1(**good).predicted_class == "mass"
    for bad in (
        {"probabilities": [0.5, 0.6]},
        {"predicted_class": "bleed"},
        {"probabilities": [1.0]},
    ):
        with pytest.raises(ValidationError):
            InferenceResultV1(**{**good, **bad})
