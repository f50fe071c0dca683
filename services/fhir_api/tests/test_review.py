"""A clinician's review through the FHIR API (issue 17, point 5), on SQLite and PostgreSQL: the
signed Observation (final / amended) with the AI's values in its history and labelled on the
current version, the final DiagnosticReport, the Provenance of the signature and the
Practitioner, written by one transaction that a concurrent change fails as a whole (412); the
422s of a blank conclusion or an unknown class; who may write; what a clinician writes from a
patient's page; and the worker's writer leaving a signed result alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from devtools.testing import served
from inference_worker.adapters.fhir_writer import FhirWriter
from inference_worker.fhir_resources import ScoredStudy, all_resources_for
from scanwatch import care_plan, clinical_review, ids
from scanwatch.clinical_review import INLINE_LABEL_URL, ReviewError, Signer
from services.auth.scopes import Scope
from services.auth.tokens import TokenService
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.test_search import HEADERS, scored

CLINICIAN_SCOPES = (
    "user/*.read user/Observation.write user/DiagnosticReport.write "
    "user/MedicationRequest.write user/Appointment.write user/CommunicationRequest.write "
    "user/Provenance.write"
)
ADA = Signer("Practitioner/staff-ada", "Dr Ada Lovelace")
SIGNED_AT = datetime(2025, 3, 6, 9, 30, tzinfo=UTC)
MARKUP = '<script>alert("x")</script><b>Glioma</b> & oedema, left temporal.'


@pytest.fixture
def staff_token(tokens: TokenService) -> Callable[..., str]:
    """``staff_token(scope, fhir_user=..., roles=...)``: a staff member's access token, as the
    authorization server issues it (``sub`` the account, ``roles``, ``fhirUser``)."""

    def make(
        scope: str = CLINICIAN_SCOPES,
        fhir_user: str | None = ADA.fhir_user,
        roles: tuple[str, ...] = ("clinician",),
        account: str = "ada",
    ) -> str:
        claims: dict[str, object] = {"roles": list(roles)}
        if fhir_user is not None:
            claims["fhirUser"] = fhir_user
        scopes = [Scope.parse(s) for s in scope.split()]
        return tokens.issue(account, scopes, claims=claims)[0]

    return make


def bearer(token: str) -> dict[str, str]:
    return {**HEADERS, "Authorization": f"Bearer {token}"}


def write_result(client: TestClient, study: ScoredStudy) -> tuple[dict, dict]:
    """The pipeline's resources of ``study`` written as the worker does; the Observation and
    the DiagnosticReport as a reader gets them (with meta.versionId)."""
    for resource in all_resources_for(study):
        url = f"/fhir/{resource['resourceType']}/{resource['id']}"
        assert client.put(url, json=resource, headers=HEADERS).status_code in (200, 201)
    key = (study.StudyInstanceUID, study.model_name, study.model_version)
    observation = client.get(f"/fhir/Observation/{ids.observation_id(*key)}").json()
    report = client.get(f"/fhir/DiagnosticReport/{ids.diagnostic_report_id(*key)}").json()
    return observation, report


def sign(
    client: TestClient, token: str, observation: dict, report: dict, chosen: str, conclusion: str
) -> httpx.Response:
    bundle = clinical_review.review_transaction(
        observation,
        report,
        chosen_class=chosen,
        conclusion=conclusion,
        signer=ADA,
        signed_at=SIGNED_AT,
    )
    return client.post("/fhir", json=bundle, headers=bearer(token))


def labelled(element: dict) -> bool:
    return any(e["url"] == INLINE_LABEL_URL for e in element.get("extension", []))


def test_a_correction_is_signed_in_one_transaction(
    client: TestClient, staff_token: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.1", "P7", p_normal=0.3))
    assert observation["status"] == "preliminary"
    assert clinical_review.finding_class(observation) == "glioma"

    response = sign(client, staff_token(), observation, report, "normal", MARKUP)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["200 OK", "200 OK", "201 Created"]

    current = client.get(f"/fhir/Observation/{observation['id']}").json()
    assert current["status"] == "amended"
    assert current["meta"]["versionId"] == "2"
    assert clinical_review.finding_class(current) == "normal"
    assert clinical_review.ai_class(current) == "glioma"
    assert current["interpretation"][0]["coding"][0]["code"] == "N"
    assert current["performer"] == [ADA.reference()]
    # The AI's values are labelled on the current version; the clinician's are not.
    assert labelled(current["valueQuantity"])
    assert all(labelled(r) for r in current["referenceRange"])
    finding, ai_finding, *probabilities = current["component"]
    assert not labelled(finding) and labelled(ai_finding)
    assert probabilities and all(labelled(c) for c in probabilities)
    # The AI's original version is still there, as it was.
    original = client.get(f"/fhir/Observation/{observation['id']}/_history/1").json()
    assert original["status"] == "preliminary"
    assert clinical_review.finding_class(original) == "glioma"
    history = client.get(f"/fhir/Observation/{observation['id']}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["amended", "preliminary"]

    final = client.get(f"/fhir/DiagnosticReport/{report['id']}").json()
    assert final["status"] == "final"
    assert final["conclusion"] == MARKUP  # stored and returned as data, not markup
    assert final["conclusionCode"][0]["coding"][0]["code"] == "normal"
    assert final["resultsInterpreter"] == [ADA.reference()]
    assert "security" not in final.get("meta", {})

    provenance = client.get(
        "/fhir/Provenance", params={"target": f"Observation/{observation['id']}"}
    ).json()
    signatures = [e["resource"] for e in provenance["entry"] if e["resource"].get("signature")]
    assert len(signatures) == 1
    signed = signatures[0]
    assert {t["reference"] for t in signed["target"]} == {
        f"Observation/{observation['id']}/_history/2",
        f"DiagnosticReport/{report['id']}/_history/2",
    }
    assert signed["agent"][0]["who"]["reference"] == ADA.fhir_user
    assert signed["agent"][0]["type"]["coding"][0]["code"] == "author"
    assert signed["entity"][0]["what"]["reference"] == (
        f"Observation/{observation['id']}/_history/1"
    )
    practitioner = client.get(f"/fhir/{ADA.fhir_user}").json()
    assert practitioner["identifier"][0]["value"] == "ada"

    # Signing again from the same (now stale) reads is a 412, and nothing changes.
    again = sign(client, staff_token(), observation, report, "glioma", "second thoughts")
    assert again.status_code == 412
    assert again.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/Observation/{observation['id']}").json()["meta"]["versionId"] == "2"


def test_a_confirmation_is_final_and_verified(
    client: TestClient, staff_token: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.2", "P7", p_normal=0.2))
    # The clinician's Practitioner exists already, with more than the minimal one: it stays.
    known = {"resourceType": "Practitioner", "id": ADA.practitioner_id, "name": [{"text": "A"}]}
    assert client.put(f"/fhir/{ADA.fhir_user}", json=known, headers=HEADERS).status_code == 201
    response = sign(client, staff_token(), observation, report, "glioma", "Agree: glioma.")
    assert response.status_code == 200, response.text
    practitioner = client.get(f"/fhir/{ADA.fhir_user}").json()
    assert (practitioner["meta"]["versionId"], practitioner["name"]) == ("1", [{"text": "A"}])
    current = client.get(f"/fhir/Observation/{observation['id']}").json()
    assert current["status"] == "final"
    assert current["interpretation"][0]["coding"][0]["code"] == "A"
    assert clinical_review.ai_class(current) == clinical_review.finding_class(current) == "glioma"
    signature = clinical_review.provenance_id(observation["id"], 2)
    provenance = client.get(f"/fhir/Provenance/{signature}").json()
    assert provenance["agent"][0]["type"]["coding"][0]["code"] == "verifier"
    assert provenance["signature"][0]["type"][0]["code"] == "1.2.840.10065.1.12.1.5"


def test_a_concurrent_change_fails_the_whole_review(
    client: TestClient, staff_token: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.3", "P7"))
    # Between the clinician's read and their signature, the report changes.
    changed = {k: v for k, v in report.items() if k != "meta"} | {"conclusion": "re-scored"}
    assert client.put(f"/fhir/DiagnosticReport/{report['id']}", json=changed).status_code == 200

    response = sign(client, staff_token(), observation, report, "normal", "Normal study.")
    assert response.status_code == 412
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert f"DiagnosticReport/{report['id']}" in outcome["issue"][0]["diagnostics"]
    # Nothing half-written: the Observation (before the report in the Bundle) is untouched,
    # no Provenance, no Practitioner.
    current = client.get(f"/fhir/Observation/{observation['id']}").json()
    assert (current["status"], current["meta"]["versionId"]) == ("preliminary", "1")
    signature = clinical_review.provenance_id(observation["id"], 2)
    assert client.get(f"/fhir/Provenance/{signature}").status_code == 404
    assert client.get(f"/fhir/{ADA.fhir_user}").status_code == 404


def test_a_review_without_if_match_is_refused(
    client: TestClient, staff_token: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.10", "P7"))
    bundle = clinical_review.review_transaction(
        observation, report, chosen_class="normal", conclusion="ok", signer=ADA,
        signed_at=SIGNED_AT,
    )  # fmt: skip
    del bundle["entry"][1]["request"]["ifMatch"]
    response = client.post("/fhir", json=bundle, headers=bearer(staff_token()))
    assert response.status_code == 428
    assert f"DiagnosticReport/{report['id']}" in response.json()["issue"][0]["diagnostics"]
    current = client.get(f"/fhir/Observation/{observation['id']}").json()
    assert current["meta"]["versionId"] == "1"


def test_a_blank_conclusion_or_unknown_class_is_a_422_naming_the_field(
    client: TestClient, staff_token: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.4", "P7"))
    # The builders refuse them first (what the console shows)...
    with pytest.raises(ReviewError) as blank:
        clinical_review.review_resources(
            observation, report, chosen_class="normal", conclusion="  ", signer=ADA,
            signed_at=SIGNED_AT,
        )  # fmt: skip
    assert blank.value.field == "DiagnosticReport.conclusion"
    with pytest.raises(ReviewError) as unknown:
        clinical_review.review_resources(
            observation, report, chosen_class="dragon", conclusion="x", signer=ADA,
            signed_at=SIGNED_AT,
        )  # fmt: skip
    assert unknown.value.field == "Observation.component:finding"

    # ...and the API refuses the same resources made by hand.
    good = clinical_review.review_transaction(
        observation, report, chosen_class="normal", conclusion="ok", signer=ADA,
        signed_at=SIGNED_AT,
    )  # fmt: skip
    blank_bundle = _with_entry(good, 1, conclusion="   ")
    response = client.post("/fhir", json=blank_bundle, headers=bearer(staff_token()))
    assert response.status_code == 422
    assert "DiagnosticReport.conclusion" in response.json()["issue"][0]["diagnostics"]

    wrong = good["entry"][0]["resource"]
    wrong["component"][0]["valueCodeableConcept"]["coding"][0]["code"] = "dragon"
    response = client.post("/fhir", json=good, headers=bearer(staff_token()))
    assert response.status_code == 422
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert "Observation.component:finding" in diagnostics and "dragon" in diagnostics
    # The same rule holds for a plain PUT.
    response = client.put(
        f"/fhir/Observation/{wrong['id']}", json=wrong, headers=bearer(staff_token())
    )
    assert response.status_code == 422
    assert client.get(f"/fhir/Observation/{observation['id']}").json()["status"] == "preliminary"


def _with_entry(bundle: dict, index: int, **changes: object) -> dict:
    entries = [dict(e) for e in bundle["entry"]]
    entries[index] = entries[index] | {"resource": entries[index]["resource"] | changes}
    return bundle | {"entry": entries}


def test_who_may_sign(
    client: TestClient, staff_token: Callable[..., str], issue: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.5", "P7"))
    patient = ids.patient_id("HOSP", "P7")
    refused = {
        "patient token": issue(
            "patient/*.read patient/CommunicationRequest.write", patient=patient
        ),
        "read-only staff token": staff_token("user/*.read"),
        "operator": staff_token(
            "user/ImagingStudy.read user/Observation.read", roles=("operator",), fhir_user=None
        ),
        "no fhirUser": staff_token(fhir_user=None),
        "operator with a write scope": staff_token(roles=("operator",)),
        "fhirUser not a Practitioner": staff_token(fhir_user=f"Patient/{patient}"),
    }
    for why, token in refused.items():
        response = sign(client, token, observation, report, "normal", "Normal.")
        assert response.status_code == 403, (why, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    # A clinician signs only as themself.
    someone_else = staff_token(fhir_user="Practitioner/staff-bob", account="bob")
    response = sign(client, someone_else, observation, report, "normal", "Normal.")
    assert response.status_code == 403
    assert "another Practitioner" in response.json()["issue"][0]["diagnostics"]
    current = client.get(f"/fhir/Observation/{observation['id']}").json()
    assert current["meta"]["versionId"] == "1"


def test_what_a_clinician_writes_from_a_patients_page(
    client: TestClient, staff_token: Callable[..., str], issue: Callable[..., str]
) -> None:
    observation, report = write_result(client, scored("7.6", "P8"))
    patient = ids.patient_id("HOSP", "P8")
    # The chatbot recorded a callback request with the patient's own token.
    asked = care_plan.callback_request(
        patient, authored_on=SIGNED_AT - timedelta(days=1), reason="Please call me"
    )
    patient_token = issue("patient/*.read patient/CommunicationRequest.write", patient=patient)
    created = client.post("/fhir/CommunicationRequest", json=asked, headers=bearer(patient_token))
    assert created.status_code == 201, created.text
    clinician = bearer(staff_token())

    prescription = care_plan.medication_request(
        patient, medication="Dexamethasone 4 mg tablet", dosage="4 mg twice a day",
        authored_on=SIGNED_AT,
    )  # fmt: skip
    response = client.post("/fhir/MedicationRequest", json=prescription, headers=clinician)
    assert response.status_code == 201, response.text
    assert response.json()["requester"] == {"reference": ADA.fhir_user}  # from fhirUser
    visit = care_plan.appointment(
        patient, start=SIGNED_AT + timedelta(days=14), minutes=20,
        description="Follow-up after the MRI", with_whom=ADA.reference(),
    )  # fmt: skip
    assert client.post("/fhir/Appointment", json=visit, headers=clinician).status_code == 201
    # Prescribing in someone else's name is refused.
    forged = prescription | {"requester": {"reference": "Practitioner/staff-bob"}}
    assert client.post("/fhir/MedicationRequest", json=forged, headers=clinician).status_code == 403

    # Working through the callback requests: the open ones, then one answered.
    open_requests = client.get(
        "/fhir/CommunicationRequest",
        params={"patient": patient, "status": "active", "category": care_plan.CALLBACK_CODE},
        headers=clinician,
    ).json()
    (entry,) = open_requests["entry"]
    read = client.get(f"/fhir/CommunicationRequest/{entry['resource']['id']}", headers=clinician)
    answered = clinical_review.answer_callback(
        read.json(), status="completed", note="Called back; result explained.", signer=ADA,
        answered_at=SIGNED_AT,
    )  # fmt: skip
    response = client.put(
        f"/fhir/CommunicationRequest/{answered['id']}",
        json=answered,
        headers=clinician | {"If-Match": read.headers["ETag"]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
    assert response.json()["note"][-1]["authorReference"]["reference"] == ADA.fhir_user
    unconditional = client.put(
        f"/fhir/CommunicationRequest/{answered['id']}", json=answered, headers=clinician
    )
    assert unconditional.status_code == 428  # a clinician updates only what they saw
    stale = client.put(
        f"/fhir/CommunicationRequest/{answered['id']}",
        json=answered | {"status": "active"},
        headers=clinician | {"If-Match": read.headers["ETag"]},
    )
    assert stale.status_code == 412

    # The timeline: every query a clinician's patient page makes, with their token.
    sign(client, staff_token(), observation, report, "normal", "Normal study.")
    found = {}
    for resource_type, query in clinical_review.timeline_queries(patient):
        bundle = client.get(f"/fhir/{resource_type}?{query}", headers=clinician).json()
        found[resource_type] = [e["resource"] for e in bundle.get("entry", [])]
    assert [o["status"] for o in found["Observation"]] == ["amended"]
    assert [r["status"] for r in found["DiagnosticReport"]] == ["final"]
    assert [m["requester"]["reference"] for m in found["MedicationRequest"]] == [ADA.fhir_user]
    assert [a["description"] for a in found["Appointment"]] == ["Follow-up after the MRI"]
    assert [c["status"] for c in found["CommunicationRequest"]] == ["completed"]


@pytest.fixture
def served_api(settings: Settings) -> Iterator[str]:
    """The FHIR API over HTTP (the worker's writer is an HTTP client), same database."""
    worker = Settings(
        **settings.model_dump(exclude={"bootstrap_clients", "port"}),
        bootstrap_clients="scanwatch-worker:worker-secret-for-tests:system/*.write system/*.read",
    )
    with served(create_app(worker), 0) as port:
        yield f"http://127.0.0.1:{port}/fhir"


def test_the_worker_never_overwrites_a_signed_result(
    served_api: str, tokens: TokenService, staff_token: Callable[..., str], tmp_path: Path
) -> None:
    study = scored("7.7", "P9", p_normal=0.3)
    writer = FhirWriter(
        served_api, client_id="scanwatch-worker", client_secret="worker-secret-for-tests"
    )
    system = tokens.issue("test-client", [Scope.parse("system/*.read")])[0]
    reader = httpx.Client(base_url=served_api, headers={"Authorization": f"Bearer {system}"})

    async def deliver() -> None:
        try:
            await writer.put_all(all_resources_for(study))
        finally:
            await writer.close()

    asyncio.run(deliver())
    key = (study.StudyInstanceUID, study.model_name, study.model_version)
    observation = reader.get(f"/Observation/{ids.observation_id(*key)}").json()
    report = reader.get(f"/DiagnosticReport/{ids.diagnostic_report_id(*key)}").json()
    bundle = clinical_review.review_transaction(
        observation, report, chosen_class="normal", conclusion="Normal study.", signer=ADA,
        signed_at=SIGNED_AT,
    )  # fmt: skip
    signed = httpx.post(served_api, json=bundle, headers=bearer(staff_token()))
    assert signed.status_code == 200, signed.text

    # Redelivered, then re-scored with other numbers: the signed result stays as signed.
    rescored = scored("7.7", "P9", p_normal=0.9)
    for delivery in (study, rescored):
        asyncio.run(_put_all(writer, all_resources_for(delivery)))
    current = reader.get(f"/Observation/{observation['id']}").json()
    assert (current["status"], current["meta"]["versionId"]) == ("amended", "2")
    final = reader.get(f"/DiagnosticReport/{report['id']}").json()
    assert (final["status"], final["conclusion"]) == ("final", "Normal study.")
    # An unsigned result of another study is still updated by a re-score.
    other, other_rescored = scored("7.8", "P9", p_normal=0.3), scored("7.8", "P9", p_normal=0.9)
    asyncio.run(_put_all(writer, all_resources_for(other)))
    asyncio.run(_put_all(writer, all_resources_for(other_rescored)))
    other_key = (other.StudyInstanceUID, other.model_name, other.model_version)
    updated = reader.get(f"/Observation/{ids.observation_id(*other_key)}").json()
    assert (updated["status"], updated["meta"]["versionId"]) == ("preliminary", "2")
    reader.close()


class SignsInBetween(httpx.AsyncBaseTransport):
    """The worker's HTTP transport, except that a clinician signs the result after the writer
    has read it and before its conditional update arrives (the race ``ifMatch`` closes): just
    before the first transaction that writes the Observation on a version it read."""

    def __init__(self, sign: Callable[[], None], observation_id: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sign = sign
        self.url = f"Observation/{observation_id}"
        self.signed = False
        self.statuses: list[int] = []  # of the writer's transactions

    def _updates_observation(self, request: httpx.Request) -> bool:
        if request.method != "POST" or not request.url.path.endswith("/fhir"):
            return False
        entries = json.loads(request.content)["entry"]
        return any(e["request"]["url"] == self.url and "ifMatch" in e["request"] for e in entries)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.signed and self._updates_observation(request):
            self.signed = True
            await asyncio.to_thread(self.sign)
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/fhir"):
            self.statuses.append(response.status_code)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_signature_between_the_workers_read_and_write_wins(
    served_api: str, tokens: TokenService, staff_token: Callable[..., str]
) -> None:
    study = scored("7.9", "P9", p_normal=0.3)
    key = (study.StudyInstanceUID, study.model_name, study.model_version)
    system = tokens.issue("test-client", [Scope.parse("system/*.read")])[0]
    reader = httpx.Client(base_url=served_api, headers={"Authorization": f"Bearer {system}"})
    credentials = {"client_id": "scanwatch-worker", "client_secret": "worker-secret-for-tests"}
    asyncio.run(_put_all(FhirWriter(served_api, **credentials), all_resources_for(study)))

    def sign_now() -> None:
        observation = reader.get(f"/Observation/{ids.observation_id(*key)}").json()
        report = reader.get(f"/DiagnosticReport/{ids.diagnostic_report_id(*key)}").json()
        bundle = clinical_review.review_transaction(
            observation, report, chosen_class="glioma", conclusion="Glioma.", signer=ADA,
            signed_at=SIGNED_AT,
        )  # fmt: skip
        answer = httpx.post(served_api, json=bundle, headers=bearer(staff_token()))
        assert answer.status_code == 200, answer.text

    racing = SignsInBetween(sign_now, ids.observation_id(*key))
    rescored = scored("7.9", "P9", p_normal=0.6)
    writer = FhirWriter(served_api, transport=racing, **credentials)
    asyncio.run(_put_all(writer, all_resources_for(rescored)))
    # Its first transaction found the result there (ifNoneMatch *: this writer never wrote it),
    # it read it, its update on that version lost the race, it read again and left it.
    assert racing.statuses == [412, 412, 200]
    current = reader.get(f"/Observation/{ids.observation_id(*key)}").json()
    assert (current["status"], current["meta"]["versionId"]) == ("final", "2")
    reader.close()


async def _put_all(writer: FhirWriter, resources: list[dict]) -> None:
    try:
        await writer.put_all(resources)
    finally:
        await writer.close()
