"""Every resource the pipeline writes validates with 0 errors under HAPI FHIR's R4 instance
validator (java/fhir-validator), run offline from the jars the bootstrap fetches from Maven
Central, with HL7's terminology release (the ``hl7.terminology.r4`` FHIR package, fetched by the
bootstrap) loaded over R4 4.0.1's code systems: R4 predates codes the resources use, such as
``v3-ObservationValue#AIAST``. Warnings (unknown external code systems, narrative advice) are
allowed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from inference_worker.fhir_resources import (
    HeatmapSeriesRef,
    ScoredSeries,
    ScoredStudy,
    all_resources_for,
    registered_resources_for,
    resources_for,
)
from scanwatch import care_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
VALIDATOR = ROOT / "java" / "fhir-validator" / "Validate.java"
VALIDATOR_HOME = Path(os.environ.get("SCANWATCH_VAR", ROOT / "var")) / "fhir-validator"
LIBS = VALIDATOR_HOME / "libs"
PACKAGES = sorted((VALIDATOR_HOME / "packages").glob("hl7.terminology.r4-*.tgz"))


def _studies() -> list[ScoredStudy]:
    full = ScoredStudy(
        PatientID="PID-1",
        IssuerOfPatientID="HOSP",
        PatientName="Doe^Jane^Q^Dr^III",
        PatientSex="F",
        PatientBirthDate=date(1980, 2, 29),
        StudyInstanceUID="1.2.840.99.1",
        series=ScoredSeries("1.2.840.99.1.1", "MR", 24, "AX T2 FLAIR", 3),
        NumberOfStudyRelatedSeries=2,
        NumberOfStudyRelatedInstances=48,
        model_name="brain-mri-anomaly",
        model_version=3,
        class_names=("normal", "mass", "bleed", "infarct"),
        probabilities=(0.1, 0.6, 0.2, 0.1),
        threshold=0.5,
        issued=datetime(2025, 3, 4, 9, 0, 12, 345000, tzinfo=UTC),
        acquired=datetime(2025, 3, 4, 8, 30),
        started=datetime(2025, 3, 4, 8, 20),
        AccessionNumber="ACC-77",
        StudyDescription="MRI brain",
        # The worker's Grad-CAM series, listed in the ImagingStudy the Observation derives from.
        heatmaps=HeatmapSeriesRef(
            SeriesInstanceUID="2.25.1234",
            SOPInstanceUIDs=("2.25.5678", "2.25.9012"),
            SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
            SeriesNumber=9901,
            SeriesDescription="AI Grad-CAM heatmaps",
        ),
    )
    minimal = ScoredStudy(
        PatientID="",
        StudyInstanceUID="1.2.840.99.2",
        series=ScoredSeries("1.2.840.99.2.1", "MR", 1),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=1,
        model_name="m",
        model_version=1,
        class_names=("normal", "abnormal"),
        probabilities=(0.9, 0.1),
        threshold=0.5,
        issued=datetime(2025, 1, 1, tzinfo=UTC),
    )
    return [full, minimal]


def _validate(resources: list[dict], folder: Path) -> dict[str, list[tuple[str, str, str]]]:
    if shutil.which("java") is None or not LIBS.is_dir() or not PACKAGES:
        pytest.fail(
            f"HAPI validator jars or HL7 terminology not fetched into {VALIDATOR_HOME} "
            "(scripts/bootstrap.sh)"
        )
    files = []
    for index, resource in enumerate(resources):
        path = folder / f"{index:02d}-{resource['resourceType']}.json"
        path.write_text(json.dumps(resource))
        files.append(str(path))
    done = subprocess.run(
        [
            "java",
            "-cp",
            f"{LIBS}/*",
            str(VALIDATOR),
            *(arg for package in PACKAGES for arg in ("--package", str(package))),
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    issues: dict[str, list[tuple[str, str, str]]] = {}
    current = ""
    for line in done.stdout.splitlines():
        kind, *fields = line.split("\t")
        if kind == "FILE":
            current = Path(fields[0]).name
            issues[current] = []
        elif kind == "ISSUE":
            issues[current].append((fields[0], fields[1], fields[2]))
    assert len(issues) == len(files)
    return issues


@pytest.fixture(scope="module")
def validation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str, str]]]:
    resources = [r for study in _studies() for r in all_resources_for(study)]
    resources += registered_resources_for(_studies()[0])[1:]  # its ImagingStudy, "registered"
    return _validate(resources + _care_plan(), tmp_path_factory.mktemp("hapi"))


def _care_plan() -> list[dict]:
    """The care-plan resources as the send-sample seed, the tests and the chatbot write them:
    the seed's (with ids, marked as test data) and a patient's callback request with every
    optional element."""
    patient = "b9f3c2a4-0000-5000-8000-000000000001"
    now = datetime(2025, 3, 4, 9, 0, tzinfo=UTC)
    return [
        *care_plan.sample_care_plan(patient, prescribed=now, today=now.date()),
        care_plan.callback_request(
            patient,
            authored_on=now,
            reason="Please call me about my MRI result",
            recipient={"display": "Radiology care team"},
            key="conversation-1/turn-3",
        ),
    ]


def _errors(issues: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [i for i in issues if i[0] in ("error", "fatal")]


def test_validator_finds_errors_in_a_broken_resource(tmp_path: Path) -> None:
    """The harness can fail: an Observation without its required status is an error."""
    observation = resources_for(_studies()[1])[-1]
    del observation["status"]
    issues = _validate([observation], tmp_path)
    assert _errors(next(iter(issues.values())))


def test_pipeline_resources_have_no_errors(validation: dict) -> None:
    assert {name.split("-", 1)[-1] for name in validation} >= {
        "Patient.json",
        "Device.json",
        "ImagingStudy.json",
        "Observation.json",
        "DiagnosticReport.json",
        "Provenance.json",
        "MedicationRequest.json",
        "Appointment.json",
        "CommunicationRequest.json",
    }
    assert {name: _errors(issues) for name, issues in validation.items()} == {
        name: [] for name in validation
    }
