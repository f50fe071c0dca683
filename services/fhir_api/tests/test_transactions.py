"""Transaction Bundles (``POST /fhir``) for every client, on SQLite and PostgreSQL (issue 20,
point 4): POST entries with ``urn:uuid`` references rewritten to the ids assigned, conditional
create (``ifNoneExist``), conditional update (``PUT Type?search``), ``ifNoneMatch: *``,
conditional references, the spec's processing order, the ``transaction-response``; any refusal
writes nothing and names its entry; a patient-bound token writes through a Bundle only what it
may write alone."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from inference_worker.adapters.fhir_writer import FhirWriter
from inference_worker.fhir_resources import ScoredStudy, all_resources_for
from scanwatch import care_plan, ids
from services.fhir_api.tests.test_hapi_validator import _errors, _studies, _validate
from services.fhir_api.tests.test_search import HEADERS

SYSTEM = "urn:scanwatch:test:mrn"
ETAG = re.compile(r'^W/"\d+"$')


def patient(value: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}]}


def observation(subject: str, text: str = "note") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"text": text},
        "subject": {"reference": subject},
    }


def post(resource: dict[str, Any], full_url: str | None = None, **request: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url is not None:
        entry["fullUrl"] = full_url
    return entry


def put(resource: dict[str, Any], url: str | None = None, **request: str) -> dict[str, Any]:
    url = url or f"{resource['resourceType']}/{resource['id']}"
    return {"resource": resource, "request": {"method": "PUT", "url": url, **request}}


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def send(
    client: TestClient, *entries: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post("/fhir", json=transaction(*entries), headers={**HEADERS, **(headers or {})})


def search(client: TestClient, query: str) -> list[dict[str, Any]]:
    bundle = client.get(f"/fhir/{query}").json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def diagnostics(response: httpx.Response) -> str:
    return " ".join(issue["diagnostics"] for issue in response.json()["issue"])


def test_posted_entries_get_ids_and_their_urn_references_follow(client: TestClient) -> None:
    person, note = "urn:uuid:0d5e0b4c-7d43-4d8e-9a2a-2b1f0c9d6a11", "urn:uuid:ab0f5a8e-1c1f"
    response = send(
        client,
        post(observation(person), note),
        post(patient("A-1"), person),
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["type"] == "transaction-response"
    first, second = (entry["response"] for entry in answer["entry"])  # request order
    assert first["status"] == second["status"] == "201 Created"
    assert first["location"].startswith("Observation/")
    assert second["location"].startswith("Patient/")
    for done in (first, second):
        assert done["location"].endswith("/_history/1")
        assert ETAG.match(done["etag"])
        assert datetime.fromisoformat(done["lastModified"]) <= datetime.now(UTC)
    patient_id = second["location"].split("/")[1]
    stored = client.get(f"/fhir/{first['location'].rsplit('/_history', 1)[0]}").json()
    assert stored["subject"] == {"reference": f"Patient/{patient_id}"}
    assert [p["id"] for p in search(client, f"Patient?identifier={SYSTEM}|A-1")] == [patient_id]


def test_conditional_create_reuses_the_match_and_its_references_follow(
    client: TestClient,
) -> None:
    existing = client.post("/fhir/Patient", json=patient("B-1"), headers=HEADERS).json()
    person = "urn:uuid:6f1c2b8e-0000-4000-8000-000000000001"
    response = send(
        client,
        post(patient("B-1"), person, ifNoneExist=f"identifier={SYSTEM}|B-1"),
        post(observation(person)),
    )
    assert response.status_code == 200, response.text
    matched, created = (entry["response"] for entry in response.json()["entry"])
    assert matched["status"] == "200 OK"
    assert matched["location"] == f"Patient/{existing['id']}/_history/1"
    assert created["status"] == "201 Created"
    assert len(search(client, f"Patient?identifier={SYSTEM}|B-1")) == 1  # nothing new
    (note,) = search(client, f"Observation?subject=Patient/{existing['id']}")
    assert note["subject"]["reference"] == f"Patient/{existing['id']}"


def test_a_condition_that_matches_several_is_a_412_and_nothing_is_written(
    client: TestClient,
) -> None:
    for _ in range(2):
        assert client.post("/fhir/Patient", json=patient("C-1"), headers=HEADERS).is_success
    person = "urn:uuid:6f1c2b8e-0000-4000-8000-000000000002"
    before = len(search(client, "Observation?_count=50"))
    response = send(
        client,
        post(observation(person, "c-1")),
        post(patient("C-1"), person, ifNoneExist=f"identifier={SYSTEM}|C-1"),
    )
    assert response.status_code == 412, response.text
    assert "Bundle.entry[1]" in diagnostics(response)
    assert len(search(client, "Observation?_count=50")) == before
    assert len(search(client, f"Patient?identifier={SYSTEM}|C-1")) == 2
    updated = send(client, put(patient("C-1"), f"Patient?identifier={SYSTEM}|C-1"))
    assert updated.status_code == 412, updated.text


def test_conditional_update_updates_the_one_match_or_creates(client: TestClient) -> None:
    created = client.post("/fhir/Patient", json=patient("D-1"), headers=HEADERS).json()
    renamed = patient("D-1") | {"gender": "female"}
    response = send(
        client,
        put(renamed, f"Patient?identifier={SYSTEM}|D-1"),
        put(patient("D-2"), f"Patient?identifier={SYSTEM}|D-2"),
    )
    assert response.status_code == 200, response.text
    updated, new = (entry["response"] for entry in response.json()["entry"])
    assert (updated["status"], updated["location"]) == (
        "200 OK",
        f"Patient/{created['id']}/_history/2",
    )
    assert new["status"] == "201 Created"
    assert client.get(f"/fhir/Patient/{created['id']}").json()["gender"] == "female"
    assert len(search(client, f"Patient?identifier={SYSTEM}|D-2")) == 1
    # A body naming another id than the match is a 400; an id taken by a non-match a 409.
    other = patient("D-1") | {"id": "someone-else"}
    assert send(client, put(other, f"Patient?identifier={SYSTEM}|D-1")).status_code == 400
    taken = patient("D-3") | {"id": created["id"]}
    assert send(client, put(taken, f"Patient?identifier={SYSTEM}|D-3")).status_code == 409
    assert client.get(f"/fhir/Patient/{created['id']}").json()["meta"]["versionId"] == "2"


def test_conditional_references_resolve_to_the_one_match(client: TestClient) -> None:
    created = client.post("/fhir/Patient", json=patient("E-1"), headers=HEADERS).json()
    response = send(client, post(observation(f"Patient?identifier={SYSTEM}|E-1", "e-1")))
    assert response.status_code == 200, response.text
    (note,) = search(client, f"Observation?subject=Patient/{created['id']}")
    assert note["subject"]["reference"] == f"Patient/{created['id']}"
    before = len(search(client, "Observation?_count=50"))
    missing = send(
        client,
        post(patient("E-9")),
        post(observation(f"Patient?identifier={SYSTEM}|E-unknown")),
    )
    assert missing.status_code == 412, missing.text
    assert "Bundle.entry[1]" in diagnostics(missing)
    assert len(search(client, "Observation?_count=50")) == before
    assert search(client, f"Patient?identifier={SYSTEM}|E-9") == []


def test_if_none_match_star_creates_only(client: TestClient) -> None:
    fixed = patient("F-1") | {"id": "fixed-f1"}
    first = send(client, put(fixed, ifNoneMatch="*"))
    assert first.json()["entry"][0]["response"]["status"] == "201 Created"
    again = send(
        client,
        put(patient("F-2") | {"id": "fixed-f2"}),
        put(fixed | {"gender": "male"}, ifNoneMatch="*"),
    )
    assert again.status_code == 412, again.text
    assert "Bundle.entry[1]" in diagnostics(again) and "Patient/fixed-f1" in diagnostics(again)
    assert client.get("/fhir/Patient/fixed-f2").status_code == 404  # all or nothing
    assert "gender" not in client.get("/fhir/Patient/fixed-f1").json()


def test_any_refusal_writes_nothing_and_names_its_entry(client: TestClient) -> None:
    person = "urn:uuid:6f1c2b8e-0000-4000-8000-000000000003"
    invalid = observation(person) | {"code": "not a CodeableConcept"}
    response = send(client, post(patient("G-1"), person), post(invalid))
    assert response.status_code == 422, response.text
    assert "Bundle.entry[1]" in diagnostics(response)
    assert search(client, f"Patient?identifier={SYSTEM}|G-1") == []
    # Two entries for one resource, a urn that names no entry, an unserved method.
    twice = patient("G-2") | {"id": "g-2"}
    assert send(client, put(twice), put(twice)).status_code == 400
    dangling = send(client, post(observation("urn:uuid:nowhere")))
    assert dangling.status_code == 400 and "Bundle.entry[0]" in diagnostics(dangling)
    delete = {"request": {"method": "DELETE", "url": "Patient/g-2"}, "resource": {}}
    assert send(client, delete).status_code == 501
    assert client.get("/fhir/Patient/g-2").status_code == 404


def test_processing_order_puts_posts_first(client: TestClient) -> None:
    """A conditional update listed before the create it could collide with: POSTs are resolved
    first, so the PUT's own id is checked against what the POST took, and the answer keeps
    request order."""
    person = "urn:uuid:6f1c2b8e-0000-4000-8000-000000000004"
    response = send(
        client,
        put(observation(person, "h-1") | {"id": "obs-h1"}),
        post(patient("H-1"), person),
    )
    assert response.status_code == 200, response.text
    statuses = [entry["response"]["location"].split("/")[0] for entry in response.json()["entry"]]
    assert statuses == ["Observation", "Patient"]
    patient_id = response.json()["entry"][1]["response"]["location"].split("/")[1]
    stored = client.get("/fhir/Observation/obs-h1").json()
    assert stored["subject"]["reference"] == f"Patient/{patient_id}"


def test_a_patient_token_writes_nothing_through_a_bundle_it_could_not_write_alone(
    client: TestClient, issue: Callable[..., str]
) -> None:
    me, other = (
        client.post("/fhir/Patient", json=patient(v), headers=HEADERS).json()["id"]
        for v in ("P-ME", "P-OTHER")
    )
    token = issue("patient/*.read patient/*.write", patient=me)
    mine = care_plan.callback_request(me, authored_on=datetime(2026, 1, 2, tzinfo=UTC))
    theirs = observation(f"Patient/{other}", "forged") | {"id": "forged-1"}
    as_patient = {"Authorization": f"Bearer {token}"}

    # Its own callback request beside another patient's Observation: refused, nothing written.
    refused = send(client, post(mine), put(theirs), headers=as_patient)
    assert refused.status_code == 403, refused.text
    assert "Bundle.entry[1]" in diagnostics(refused)
    assert search(client, f"CommunicationRequest?patient={me}") == []
    assert client.get("/fhir/Observation/forged-1").status_code == 404
    # A callback request in another patient's name, even by a conditional reference.
    for subject in (f"Patient/{other}", f"Patient?identifier={SYSTEM}|P-OTHER"):
        forged = mine | {"subject": {"reference": subject}, "requester": {"reference": subject}}
        answer = send(client, post(mine), post(forged), headers=as_patient)
        assert answer.status_code in (403, 412), answer.text
        assert "Bundle.entry[1]" in diagnostics(answer)
    assert search(client, "CommunicationRequest?_count=50") == []
    # A conditional create's match is searched in its own compartment only: another patient's
    # request with the same identifier is neither matched nor shown.
    key = f"{ids.CALLBACK_REQUEST_ID_SYSTEM}|turn-1"
    at = datetime(2026, 1, 3, tzinfo=UTC)
    elsewhere = care_plan.callback_request(other, authored_on=at, key="turn-1")
    assert client.post("/fhir/CommunicationRequest", json=elsewhere, headers=HEADERS).is_success
    own = care_plan.callback_request(me, authored_on=at, key="turn-1")
    probe = send(client, post(own, ifNoneExist=f"identifier={key}"), headers=as_patient)
    assert probe.status_code == 200, probe.text
    assert probe.json()["entry"][0]["response"]["status"] == "201 Created"
    again = send(client, post(own, ifNoneExist=f"identifier={key}"), headers=as_patient)
    assert again.json()["entry"][0]["response"]["status"] == "200 OK"  # its own, once
    (written,) = search(client, f"CommunicationRequest?patient={me}")
    assert written["subject"]["reference"] == f"Patient/{me}"


@pytest.mark.integration
def test_transactions_and_their_answers_validate(client: TestClient, tmp_path: Path) -> None:
    """The worker's transactions (create-only, then on the version it wrote), a client's POST
    entries with urn:uuid and conditional references, and the transaction-response Bundles the
    API answers: 0 errors under HAPI FHIR's R4 validator."""
    exchanged: list[dict[str, Any]] = []

    def forward(request: httpx.Request) -> httpx.Response:
        answer = client.request(
            request.method, request.url.path, content=request.content, headers=HEADERS
        )
        if request.method == "POST":
            exchanged.extend([json.loads(request.content), answer.json()])
        return httpx.Response(answer.status_code, content=answer.content, headers=answer.headers)

    study = _studies()[0]
    again = ScoredStudy(**(vars(study) | {"probabilities": tuple(reversed(study.probabilities))}))
    writer = FhirWriter("http://fhir.test/fhir", transport=httpx.MockTransport(forward))

    async def write() -> None:
        try:
            for scored in (study, again):
                await writer.put_all(all_resources_for(scored))
        finally:
            await writer.close()

    asyncio.run(write())
    person = "urn:uuid:6f1c2b8e-0000-4000-8000-000000000005"
    bundle = transaction(
        post(patient("V-1"), person, ifNoneExist=f"identifier={SYSTEM}|V-1"),
        post(observation(person), "urn:uuid:6f1c2b8e-0000-4000-8000-000000000006"),
        put(patient("V-1") | {"gender": "other"}, f"Patient?identifier={SYSTEM}|V-1"),
    )
    assert send(client, *bundle["entry"][:2]).status_code == 200
    answer = send(client, bundle["entry"][2])
    assert answer.status_code == 200, answer.text
    exchanged += [bundle, answer.json()]
    kinds = [b["type"] for b in exchanged]
    assert kinds == ["transaction", "transaction-response"] * 3
    issues = _validate(exchanged, tmp_path)
    assert {name: _errors(found) for name, found in issues.items()} == {name: [] for name in issues}


@pytest.mark.parametrize("how", ["header", "ifNoneExist", "conditional update"])
def test_concurrent_conditional_creates_make_one_resource(client: TestClient, how: str) -> None:
    """Eight clients at once create the same patient, each only if none exists: one is created,
    and every answer names it (the match and the write are one step, per condition)."""
    value = f"R-{how}"
    condition = f"identifier={SYSTEM}|{value}"
    start = threading.Barrier(8)

    def create(_: int) -> httpx.Response:
        start.wait()
        if how == "header":
            headers = {**HEADERS, "If-None-Exist": condition}
            return client.post("/fhir/Patient", json=patient(value), headers=headers)
        if how == "ifNoneExist":
            return send(client, post(patient(value), ifNoneExist=condition))
        return send(client, put(patient(value), f"Patient?{condition}"))

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(create, range(8)))
    assert all(r.is_success for r in responses), [r.text for r in responses]
    (created,) = search(client, f"Patient?{condition}")
    for response in responses:
        body = response.json()
        if body["resourceType"] == "Bundle":
            location = body["entry"][0]["response"]["location"]
            assert location.startswith(f"Patient/{created['id']}/_history/"), location
        else:
            assert body["id"] == created["id"]
