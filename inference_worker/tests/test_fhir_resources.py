"""Unit tests of the FHIR builders: shapes, deterministic ids, interpretation, R4B validity."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from fhir.resources.R4B import get_fhir_model_class

from inference_worker import fhir_resources as fr
from inference_worker.header import dicom_timezone
from scanwatch import ids

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.2"
CLASSES = ("glioma", "meningioma", "normal", "pituitary")
PROBS = (0.61, 0.09, 0.25, 0.05)
ISSUED = datetime(2025, 3, 4, 9, 17, 42, 120000, tzinfo=UTC)


def make_study(**changes: object) -> fr.ScoredStudy:
    study = fr.ScoredStudy(
        PatientID="PID-001",
        IssuerOfPatientID="HOSPITAL A",
        PatientName="Doe^Jane^Q^Dr^",
        PatientSex="F",
        PatientBirthDate=date(1970, 5, 17),
        StudyInstanceUID=STUDY_UID,
        AccessionNumber="ACC-1",
        StudyDescription="MR BRAIN",
        started=datetime(2025, 3, 4, 10, 5),
        acquired=datetime(2025, 3, 4, 10, 15),
        timezone=timezone(timedelta(hours=1)),
        series=fr.ScoredSeries(
            SeriesInstanceUID=SERIES_UID,
            Modality="MR",
            NumberOfSeriesRelatedInstances=24,
            SeriesDescription="AX T2 FLAIR",
            SeriesNumber=3,
        ),
        NumberOfStudyRelatedSeries=3,
        NumberOfStudyRelatedInstances=70,
        model_name="brain-mri-anomaly",
        model_version=2,
        class_names=CLASSES,
        probabilities=PROBS,
        threshold=0.5,
        issued=ISSUED,
    )
    return dataclasses.replace(study, **changes)


def by_code(observation: dict, code: str) -> dict:
    matches = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    assert len(matches) == 1, code
    return matches[0]


def test_resources_come_in_dependency_order_and_validate_as_r4b() -> None:
    resources = fr.resources_for(make_study())
    assert [r["resourceType"] for r in resources] == [
        "Patient",
        "Device",
        "ImagingStudy",
        "Observation",
    ]
    for resource in resources:
        model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert model.id == resource["id"]


def canonical(resource: dict) -> dict:
    """``resource`` validated by its R4B model, in that model's JSON form (what the FHIR API
    stores and gives back)."""
    model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return json.loads(model.model_dump_json())


_EVIDENCE = fr.Evidence("top_3_mean", "1.2.826.0.1.3680043.8.498.7", 4, 0.93)
_HEATMAPS = fr.HeatmapSeriesRef(
    SeriesInstanceUID="1.2.826.0.1.3680043.8.498.9",
    SOPInstanceUIDs=("1.2.826.0.1.3680043.8.498.9.1", "1.2.826.0.1.3680043.8.498.9.2"),
    SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
    SeriesNumber=9001,
    SeriesDescription="AI heatmap",
)
#: Studies that differ in everything a builder formats: times (UTC or not, with a fraction or
#: none, beyond the millisecond), optional DICOM attributes, evidence and heatmaps.
STUDIES = {
    "full": {},
    "evidence and heatmaps": {"evidence": _EVIDENCE, "heatmaps": _HEATMAPS},
    "microseconds": {"issued": datetime(2025, 3, 4, 9, 17, 42, 123456, tzinfo=UTC)},
    "whole seconds": {"issued": datetime(2025, 3, 4, 9, 17, 42, tzinfo=UTC)},
    "issued in +05:30": {
        "issued": datetime(
            2025, 3, 4, 9, 17, 42, 5000, tzinfo=timezone(timedelta(hours=5, minutes=30))
        )
    },  # fmt: skip
    "acquired with a fraction, in UTC": {
        "acquired": datetime(2025, 3, 4, 10, 15, 0, 500000),
        "timezone": UTC,
    },
    "minimal": {
        "IssuerOfPatientID": None,
        "PatientName": None,
        "PatientSex": None,
        "PatientBirthDate": None,
        "AccessionNumber": None,
        "StudyDescription": None,
        "started": None,
        "acquired": None,
        "series": fr.ScoredSeries(SERIES_UID, "MR", 1, None, None),
    },
    "odd name and sex": {"PatientName": "=Yamada^Tarou", "PatientSex": "O"},
}


@pytest.mark.parametrize("changes", STUDIES.values(), ids=STUDIES.keys())
def test_every_resource_is_valid_r4b_in_its_canonical_form(changes: dict) -> None:
    """The builders skip the R4B round trip: what they make must already be what it gives."""
    study = make_study(**changes)
    for resource in [*fr.registered_resources_for(study), *fr.all_resources_for(study)]:
        assert resource == canonical(resource), resource["resourceType"]


def test_ids_are_deterministic_and_from_scanwatch_ids() -> None:
    first, second = fr.resources_for(make_study()), fr.resources_for(make_study())
    assert first == second
    patient, device, imaging, observation = first
    assert patient["id"] == ids.patient_id("HOSPITAL A", "PID-001")
    assert device["id"] == ids.device_id("brain-mri-anomaly", 2)
    assert imaging["id"] == ids.imaging_study_id(STUDY_UID)
    assert observation["id"] == ids.observation_id(STUDY_UID, "brain-mri-anomaly", 2)
    other_version = fr.observation(make_study(model_version=3))
    assert other_version["id"] != observation["id"]


def test_observation_shape() -> None:
    obs = fr.observation(make_study())
    imaging_ref = f"ImagingStudy/{ids.imaging_study_id(STUDY_UID)}"
    assert obs["meta"]["security"][0]["code"] == fr.AI_ASSERTED
    assert obs["identifier"] == [{"system": ids.OBSERVATION_ID_SYSTEM, "value": obs["id"]}]
    assert obs["status"] == "preliminary"
    assert obs["category"][0]["coding"][0]["code"] == "imaging"
    assert obs["code"]["coding"][0] == {
        "system": fr.CODE_SYSTEM,
        "code": fr.ANOMALY_SCORE_CODE,
        "display": fr.ANOMALY_SCORE_DISPLAY,
    }
    assert obs["code"]["text"]
    assert obs["subject"]["reference"] == f"Patient/{ids.patient_id('HOSPITAL A', 'PID-001')}"
    assert obs["effectiveDateTime"] == "2025-03-04T10:15:00+01:00"
    assert obs["issued"].startswith("2025-03-04T09:17:42.12")
    assert obs["valueQuantity"]["value"] == pytest.approx(0.75)
    assert obs["valueQuantity"]["system"] == fr.UCUM_SYSTEM
    assert obs["valueQuantity"]["code"] == "1"
    assert obs["referenceRange"][0]["high"]["value"] == 0.5
    assert obs["device"] == {
        "reference": f"Device/{ids.device_id('brain-mri-anomaly', 2)}",
        "display": "brain-mri-anomaly v2",
    }
    assert obs["derivedFrom"] == [{"reference": imaging_ref}]
    assert obs["partOf"] == [{"reference": imaging_ref}]
    assert obs["basedOn"][0]["identifier"]["value"] == "ACC-1"
    finding = obs["component"][0]
    assert finding["code"]["coding"][0] == {
        "system": fr.DCM_SYSTEM,
        "code": "121071",
        "display": "Finding",
    }
    assert finding["valueCodeableConcept"]["coding"][0] == {
        "system": fr.CLASS_SYSTEM,
        "code": "glioma",
    }
    assert "not reviewed" in obs["note"][0]["text"]
    assert "brain-mri-anomaly v2" in obs["note"][0]["text"]


def test_one_component_per_class_with_the_input_probability() -> None:
    obs = fr.observation(make_study())
    assert len(obs["component"]) == 1 + len(CLASSES)
    for name, p in zip(CLASSES, PROBS, strict=True):
        component = by_code(obs, f"p-{name}")
        assert component["code"]["coding"][0]["system"] == fr.CODE_SYSTEM
        assert component["valueQuantity"]["value"] == p


def test_the_strongest_slice_and_the_study_rule_are_components() -> None:
    evidence = fr.Evidence("top_3_mean", "1.2.826.0.1.3680043.8.498.7", 4, 0.93)
    obs = fr.observation(make_study(evidence=evidence))
    # The class components stay first and as they were.
    assert obs["component"][: 1 + len(CLASSES)] == fr.observation(make_study())["component"]
    assert len(obs["component"]) == 1 + len(CLASSES) + 4
    assert by_code(obs, "study-rule")["valueString"] == "top_3_mean"
    assert by_code(obs, "strongest-slice")["valueString"] == "1.2.826.0.1.3680043.8.498.7"
    assert by_code(obs, "strongest-slice-frame")["valueInteger"] == 5  # frame numbers: 1-based
    assert by_code(obs, "strongest-slice-anomaly-score")["valueQuantity"]["value"] == 0.93
    assert all(c["code"]["coding"][0]["system"] == fr.CODE_SYSTEM for c in obs["component"][1:])
    get_fhir_model_class("Observation").model_validate(obs)
    # A single-frame instance has no frame number; rebuilt, the resource is the same bytes.
    single = fr.observation(make_study(evidence=dataclasses.replace(evidence, frame=None)))
    assert "strongest-slice-frame" not in str(single["component"])
    assert single == fr.observation(make_study(evidence=dataclasses.replace(evidence, frame=None)))


def test_evidence_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        fr.Evidence("max", "1.2.3", None, 1.5)


@pytest.mark.parametrize(
    ("p_normal", "expected"),
    [(0.49, "A"), (0.5, "N"), (0.51, "N"), (1.0, "N"), (0.0, "A")],
)
def test_interpretation_against_the_threshold(p_normal: float, expected: str) -> None:
    rest = (1.0 - p_normal) / 3
    study = make_study(probabilities=(rest, rest, p_normal, rest))
    obs = fr.observation(study)
    assert obs["interpretation"][0]["coding"][0]["code"] == expected
    assert obs["interpretation"][0]["coding"][0]["system"] == fr.INTERPRETATION_SYSTEM


def test_device_names_the_model_version() -> None:
    dev = fr.device(make_study())
    assert dev["identifier"] == [{"system": ids.DEVICE_ID_SYSTEM, "value": "brain-mri-anomaly|2"}]
    assert dev["deviceName"] == [{"name": "brain-mri-anomaly", "type": "model-name"}]
    assert dev["version"][0]["value"] == "2"
    assert dev["type"]["text"]


def test_imaging_study_shape() -> None:
    study = fr.imaging_study(make_study())
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}
    assert study["identifier"][1]["value"] == "ACC-1"
    assert study["status"] == "available"
    assert study["started"] == "2025-03-04T10:05:00+01:00"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (3, 70)
    assert study["series"] == [
        {
            "uid": SERIES_UID,
            "number": 3,
            "modality": {"system": fr.DCM_SYSTEM, "code": "MR"},
            "description": "AX T2 FLAIR",
            "numberOfInstances": 24,
        }
    ]


def test_patient_from_dicom() -> None:
    pat = fr.patient(make_study())
    assert pat["identifier"][0]["system"] == "urn:scanwatch:patient-id:HOSPITAL%20A"
    assert pat["identifier"][0]["value"] == "PID-001"
    assert pat["name"] == [
        {"text": "Dr Jane Q Doe", "family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"]}
    ]
    assert pat["gender"] == "female"
    assert pat["birthDate"] == "1970-05-17"


def test_minimal_study_without_optional_dicom_attributes() -> None:
    study = make_study(
        IssuerOfPatientID=None,
        PatientName=None,
        PatientSex=None,
        PatientBirthDate=None,
        AccessionNumber=None,
        StudyDescription=None,
        started=None,
        acquired=None,
    )
    pat, _, imaging, obs = fr.resources_for(study)
    assert pat["identifier"][0]["system"] == fr.PATIENT_ID_SYSTEM
    assert not {"name", "gender", "birthDate"} & set(pat)
    assert "started" not in imaging and len(imaging["identifier"]) == 1
    assert "effectiveDateTime" not in obs and "basedOn" not in obs


def test_empty_patient_id_gives_a_patient_per_study() -> None:
    a = fr.patient(make_study(PatientID=""))
    b = fr.patient(make_study(PatientID="", StudyInstanceUID="1.2.3.4.5"))
    assert "identifier" not in a
    assert a["id"] != b["id"]


def test_effective_falls_back_to_study_start() -> None:
    obs = fr.observation(make_study(acquired=None))
    assert obs["effectiveDateTime"] == "2025-03-04T10:05:00+01:00"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"probabilities": (0.5, 0.5)}, "differ in length"),
        ({"class_names": ("a", "b", "c", "d")}, "normal"),
        ({"threshold": 1.5}, "threshold"),
        ({"issued": datetime(2025, 1, 1)}, "timezone-aware"),
    ],
)
def test_inconsistent_input_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_study(**changes)


def test_dicom_timezone() -> None:
    assert dicom_timezone("+0130").utcoffset(None) == timedelta(hours=1, minutes=30)
    assert dicom_timezone("-0500").utcoffset(None) == timedelta(hours=-5)
    assert dicom_timezone(None) is UTC
    assert dicom_timezone("bogus") is UTC


def test_report_and_provenance_point_at_the_result():
    study = make_study()
    *core, report, prov = fr.all_resources_for(study)
    assert core == fr.resources_for(study)
    obs, imaging, device = core[3], core[2], core[1]
    assert report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "preliminary"
    assert report["result"] == [{"reference": f"Observation/{obs['id']}"}]
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{imaging['id']}"}]
    assert report["subject"] == obs["subject"]
    assert report["meta"]["security"][0]["code"] == "AIAST"
    assert "not reviewed" in report["conclusion"]
    assert prov["resourceType"] == "Provenance"
    assert {t["reference"] for t in prov["target"]} == {
        f"Observation/{obs['id']}",
        f"DiagnosticReport/{report['id']}",
    }
    assert prov["agent"][0]["who"]["reference"] == f"Device/{device['id']}"
    assert prov["entity"][0]["what"]["reference"] == f"ImagingStudy/{imaging['id']}"
    assert prov["recorded"] == obs["issued"]
    # Deterministic: the same study gives the same ids (idempotent PUTs).
    again = fr.all_resources_for(make_study())
    assert [r["id"] for r in again[-2:]] == [report["id"], prov["id"]]
