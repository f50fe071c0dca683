"""A result a clinician signed, through the portal's routes with the patient's own token, read
from the real FHIR API: the study is written as the worker writes it, signed by a clinician's
transaction (``scanwatch.clinical_review``), and the patient's pages then say it was reviewed
and corrected, show the clinician's class and their conclusion, escaped.

The fake hospital (``fakes.py``) stands in for the authorization server and the chat only:
every FHIR request of the portal goes to the FHIR API app, which verifies the patient's token
(same signing keys) and enforces the compartment itself."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from inference_worker.fhir_resources import ScoredSeries, ScoredStudy, all_resources_for
from scanwatch import clinical_review, ids
from scanwatch.patient_records import CLASS_WORDS
from services.auth.scopes import parse_scopes
from services.fhir_api.app import create_app as create_fhir_app
from services.fhir_api.config import Settings as FhirSettings
from services.portal.app import create_app
from services.portal.tests.fakes import FHIR, FakeHospital, settings
from services.portal.tests.test_app import BASE, sign_in

CONCLUSION = '<script>alert("x")</script><b>No mass</b> &amp; a normal variant.'
SIGNER = clinical_review.Signer("Practitioner/staff-ada", "Dr Ada Lovelace")
STUDY = ScoredStudy(
    PatientID="P-REVIEWED",
    IssuerOfPatientID="HOSP",
    StudyInstanceUID="1.2.826.0.1.3680043.8.498.77",
    series=ScoredSeries("1.2.826.0.1.3680043.8.498.77.1", "MR", 12),
    NumberOfStudyRelatedSeries=1,
    NumberOfStudyRelatedInstances=12,
    model_name="brain-mri-anomaly",
    model_version=1,
    class_names=("normal", "mass", "bleed"),
    probabilities=(0.2, 0.7, 0.1),
    threshold=0.5,
    issued=datetime(2025, 6, 1, 12, tzinfo=UTC),
    acquired=datetime(2025, 6, 1, 8, 30),
    StudyDescription="MRI brain",
)
PATIENT = ids.patient_id("HOSP", "P-REVIEWED")
KEY = (STUDY.StudyInstanceUID, STUDY.model_name, STUDY.model_version)
OBSERVATION = ids.observation_id(*KEY)


@pytest.fixture
def fhir(tmp_path: Path, signing_keys: Path) -> Iterator[TestClient]:
    """The real FHIR API (SQLite), tokens required, with the study written and signed."""
    app = create_fhir_app(
        FhirSettings(
            database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
            auth_mode="required",
            signing_keys_file=signing_keys,
        )
    )
    with TestClient(app) as client:
        hospital = FakeHospital(signing_keys)  # only for its token service
        system = hospital.tokens.issue("worker", parse_scopes("system/*.read system/*.write"))[0]
        headers = {"Authorization": f"Bearer {system}", "Content-Type": "application/fhir+json"}
        for resource in all_resources_for(STUDY):
            url = f"/fhir/{resource['resourceType']}/{resource['id']}"
            assert client.put(url, json=resource, headers=headers).status_code == 201
        observation = client.get(f"/fhir/Observation/{OBSERVATION}", headers=headers).json()
        report_id = ids.diagnostic_report_id(*KEY)
        report = client.get(f"/fhir/DiagnosticReport/{report_id}", headers=headers).json()
        clinician = hospital.tokens.issue(
            "ada",
            parse_scopes("user/*.read user/Observation.write user/DiagnosticReport.write "
                         "user/Provenance.write"),
            claims={"roles": ["clinician"], "fhirUser": SIGNER.fhir_user},
        )[0]  # fmt: skip
        bundle = clinical_review.review_transaction(
            observation,
            report,
            chosen_class="normal",
            conclusion=CONCLUSION,
            signer=SIGNER,
            signed_at=datetime(2025, 6, 2, 9, 0, tzinfo=UTC),
        )
        signed = client.post(
            "/fhir", json=bundle, headers=headers | {"Authorization": f"Bearer {clinician}"}
        )
        assert signed.status_code == 200, signed.text
        yield client


@pytest.fixture
def portal(signing_keys: Path, fhir: TestClient) -> Iterator[tuple[TestClient, FakeHospital]]:
    hospital = FakeHospital(signing_keys, records={})

    def handle(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url.startswith(f"{FHIR}/") and "/.well-known/" not in url:
            answer = fhir.request(
                request.method,
                "/fhir" + url[len(FHIR) :],
                headers={
                    k: v
                    for k, v in request.headers.items()
                    if k.lower() in ("authorization", "accept", "content-type")
                },
                content=request.content,
            )
            return httpx.Response(
                answer.status_code,
                content=answer.content,
                headers={"content-type": answer.headers.get("content-type", "")},
            )
        return hospital.handle(request)

    app = create_app(settings(), transport=httpx.MockTransport(handle), verifier=hospital.verify)
    with TestClient(app, base_url=BASE, follow_redirects=False) as client:
        yield client, hospital


def test_the_patient_sees_the_signed_result(portal: tuple[TestClient, FakeHospital]) -> None:
    client, hospital = portal
    sign_in(client, hospital, PATIENT)

    listing = client.get("/")
    assert listing.status_code == 200, listing.text
    card = listing.text[listing.text.index('<li class="card') :]
    assert "reviewed-badge" in card and "preliminary-badge" not in card
    assert "Reviewed by a clinician" in card
    assert str(escape(CONCLUSION)) in card  # the conclusion, escaped once by the template
    assert '<script>alert("x")' not in listing.text
    assert "Signed by Dr Ada Lovelace on 2 June 2025" in card
    # Flagged is still what the AI said (0.80 above 0.50), not the clinician's correction.
    assert "flagged it for a closer look" in card

    detail = client.get(f"/results/{OBSERVATION}")
    assert detail.status_code == 200, detail.text
    text = detail.text
    assert "and corrected the computer&#39;s reading" in text
    assert str(escape(CONCLUSION)) in text and "<b>No mass</b>" not in text
    # The pattern shown is the clinician's class, not the AI's "mass".
    normal = CLASS_WORDS["normal"]
    assert f"<dd>{normal[0].upper()}{normal[1:]}</dd>" in text
    assert f"<dd>{CLASS_WORDS['mass'][0].upper()}" not in text
