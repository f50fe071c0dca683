"""Two patients' records for trying and testing the chatbot: AI results built by the worker's
own FHIR builders (``inference_worker.fhir_resources``), one reviewed by a clinician with a
signed report, and care-plan resources (``scanwatch.care_plan``).

- ``ALICE``: three MRI studies (January, March, May 2025) whose anomaly score falls (worse
  to better), the March one reviewed with a final report; one active and one stopped
  prescription; a booked follow-up visit;
- ``BOB``: one study (June 2025), preliminary; another prescription and visit. The tests check
  that nothing of Bob's ever reaches Alice.

``python -m devtools.chatbot_records --write chatbot/tests/fhir_records.json`` writes them as
the chatbot's unit tests read them (its virtualenv has no FHIR library); a test checks the
file is what this module builds. :func:`seed` PUTs them into a FHIR API.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from inference_worker.fhir_resources import (
    ScoredSeries,
    ScoredStudy,
    all_resources_for,
)
from scanwatch import care_plan, ids

ISSUER = "HOSP"
ALICE, BOB = "CHAT-ALICE", "CHAT-BOB"
FIXTURE = Path(__file__).resolve().parents[1] / "chatbot" / "tests" / "fhir_records.json"
#: The follow-up visits (far enough ahead to stay "next" for years).
VISIT = datetime(2031, 1, 15, 10, 0, tzinfo=UTC)
CONCLUSION = (
    "Small area of signal change in the left frontal lobe, smaller than in January. "
    "No new findings."
)


def _study(patient: str, uid: str, day: datetime, p_normal: float, name: str) -> ScoredStudy:
    """A scored study as the worker builds it (four classes, threshold 0.5)."""
    return ScoredStudy(
        PatientID=patient,
        IssuerOfPatientID=ISSUER,
        PatientName=name,
        StudyInstanceUID=uid,
        series=ScoredSeries(f"{uid}.1", "MR", 24, "AX T2 FLAIR", 3),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=24,
        model_name="brain-mri-anomaly",
        model_version=1,
        class_names=("normal", "mass", "bleed", "infarct"),
        probabilities=tuple(
            round(p, 3) for p in (p_normal, *(rest * (1 - p_normal) for rest in (0.7, 0.2, 0.1)))
        ),
        threshold=0.5,
        issued=day.replace(hour=12),
        acquired=day.replace(hour=8, tzinfo=None),
        StudyDescription="MRI brain",
    )


def _reviewed(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's result as a clinician signed it: the Observation final, the report final
    with a conclusion."""
    out = []
    for resource in resources:
        if resource["resourceType"] == "Observation":
            resource = resource | {"status": "final"}
        elif resource["resourceType"] == "DiagnosticReport":
            resource = resource | {
                "status": "final",
                "conclusion": CONCLUSION,
                "issued": "2025-03-12T15:00:00Z",
                "resultsInterpreter": [{"display": "Dr. Rivera, radiologist"}],
            }
        out.append(resource)
    return out


def records() -> dict[str, list[dict[str, Any]]]:
    """Each patient's resources (by PatientID), in the order they can be written."""
    return {
        ALICE: patient_records(
            ALICE, "Liddell^Alice", ((1, 14, 0.22), (3, 11, 0.41), (5, 20, 0.71))
        ),
        BOB: patient_records(
            BOB, "Builder^Bob", ((6, 3, 0.12),), "Dexamethasone 4 mg oral tablet", visit_day=20
        ),
    }


def patient_records(
    patient: str,
    name: str,
    studies: tuple[tuple[int, int, float], ...],
    medication: str = "Levetiracetam 500 mg oral tablet",
    visit_day: int = VISIT.day,
    reviewed_month: int = 3,
) -> list[dict[str, Any]]:
    """One patient's records: a study per (month, day, p(normal)) of 2025, the one of
    ``reviewed_month`` signed by a clinician; an active and a stopped prescription; a visit."""
    resources: list[dict[str, Any]] = []
    for index, (month, day, p_normal) in enumerate(studies):
        study = _study(
            patient,
            f"2.25.{_uid(patient)}.{index}",
            datetime(2025, month, day, tzinfo=UTC),
            p_normal,
            name,
        )
        written = all_resources_for(study)
        resources += _reviewed(written) if month == reviewed_month else written
    patient_id = ids.patient_id(ISSUER, patient)
    key = patient.lower()
    return resources + [
        care_plan.medication_request(
            patient_id,
            medication=medication,
            dosage="one tablet twice a day",
            authored_on=datetime(2025, 3, 12, tzinfo=UTC),
            resource_id=f"{key}-medication-active",
        ),
        care_plan.medication_request(
            patient_id,
            medication="Paracetamol 500 mg",
            dosage="as needed",
            authored_on=datetime(2025, 1, 15, tzinfo=UTC),
            status="stopped",
            resource_id=f"{key}-medication-stopped",
        ),
        care_plan.appointment(
            patient_id,
            start=VISIT.replace(day=visit_day),
            minutes=30,
            description="Follow-up visit to discuss the MRI result",
            with_whom={"display": "Neuro-oncology clinic"},
            resource_id=f"{key}-visit",
        ),
    ]


def _uid(patient: str) -> int:
    """A number for the patient's study UIDs (DICOM UIDs are digits and dots)."""
    return int.from_bytes(patient.encode()[-6:], "big")


def patient_id(patient: str) -> str:
    """The Patient logical id of one of :data:`ALICE`, :data:`BOB`."""
    return ids.patient_id(ISSUER, patient)


def seed(
    fhir_base: str,
    headers: dict[str, str] | None = None,
    patients: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    """PUT every record (of :func:`records`, or ``patients``) into the FHIR API at
    ``fhir_base`` (idempotent)."""
    with httpx.Client(base_url=fhir_base.rstrip("/"), headers=headers, timeout=30) as client:
        for resources in (patients or records()).values():
            for resource in resources:
                answer = client.put(
                    f"/{resource['resourceType']}/{resource['id']}",
                    json=resource,
                    headers={"Content-Type": "application/fhir+json"},
                )
                answer.raise_for_status()


def fixture_text() -> str:
    """The fixture file's content: ``{"<Patient id>": [resources...]}``."""
    by_id = {patient_id(p): resources for p, resources in records().items()}
    return json.dumps(by_id, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=FIXTURE, help="fixture file to write")
    args = parser.parse_args(argv)
    args.write.write_text(fixture_text())
    sys.stderr.write(f"wrote {args.write}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
