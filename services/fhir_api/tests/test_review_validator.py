"""Every resource a clinician's review writes validates with 0 errors under HAPI FHIR's R4
validator (the harness of ``test_hapi_validator``): the signed Observation (confirmed and
corrected), the final DiagnosticReport, the Provenance of the signature, the Practitioner, the
answered callback request, a clinician's prescription and follow-up, and the transaction
Bundle itself."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from inference_worker.fhir_resources import all_resources_for
from scanwatch import care_plan, clinical_review
from services.fhir_api.tests.test_hapi_validator import _errors, _studies, _validate

pytestmark = pytest.mark.integration

SIGNER = clinical_review.Signer("Practitioner/staff-7", "Dr Ada Lovelace")
NOW = datetime(2025, 3, 5, 10, 0, tzinfo=UTC)


def _as_read(resource: dict, version: int) -> dict:
    meta = {**resource.get("meta", {}), "versionId": str(version)}
    return {**resource, "meta": meta}


def _review_resources() -> list[dict]:
    resources: list[dict] = []
    for study, chosen in zip(_studies(), ("bleed", "normal"), strict=True):
        written = all_resources_for(study)
        observation, report = _as_read(written[3], 1), _as_read(written[4], 1)
        bundle = clinical_review.review_transaction(
            observation,
            report,
            chosen_class=chosen,
            conclusion='<script>alert("x")</script> Small bleed, left frontal & stable.',
            signer=SIGNER,
            signed_at=NOW,
            base="https://fhir.example.org/fhir",
        )
        resources += [entry["resource"] for entry in bundle["entry"]]
        resources.append(bundle)
    # A confirmation: the AI's own class.
    study = _studies()[0]
    written = all_resources_for(study)
    resources += clinical_review.review_resources(
        _as_read(written[3], 1),
        _as_read(written[4], 2),
        chosen_class=study.predicted_class,
        conclusion="Agree with the AI.",
        signer=SIGNER,
        signed_at=NOW,
    )
    patient = "b9f3c2a4-0000-5000-8000-000000000001"
    request = _as_read(
        care_plan.callback_request(patient, authored_on=NOW, reason="Call me") | {"id": "cb-1"}, 1
    )
    resources += [
        clinical_review.practitioner(SIGNER, account="ada"),
        clinical_review.practitioner(clinical_review.Signer("Practitioner/p2")),
        clinical_review.answer_callback(
            request,
            status="completed",
            note="Called back; explained.",
            signer=SIGNER,
            answered_at=NOW,
        ),
        care_plan.medication_request(
            patient,
            medication="Dexamethasone 4 mg tablet",
            dosage="4 mg twice a day",
            authored_on=NOW,
            requester=SIGNER.reference(),
        ),
        care_plan.appointment(
            patient,
            start=NOW,
            minutes=20,
            description="Follow-up after the MRI",
            with_whom=SIGNER.reference(),
        ),
    ]
    return resources


def test_review_resources_have_no_errors(tmp_path: Path) -> None:
    resources = _review_resources()
    statuses = {r["status"] for r in resources if r["resourceType"] == "Observation"}
    assert statuses == {"final", "amended"}
    issues = _validate(resources, tmp_path)
    kinds = {name.split("-", 1)[-1] for name in issues}
    assert kinds >= {
        "Observation.json",
        "DiagnosticReport.json",
        "Provenance.json",
        "Practitioner.json",
        "CommunicationRequest.json",
        "MedicationRequest.json",
        "Appointment.json",
        "Bundle.json",
    }
    assert {name: _errors(found) for name, found in issues.items()} == {name: [] for name in issues}
