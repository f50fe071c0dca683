"""MedicationRequest, Appointment and the patient's callback request (CommunicationRequest)
through the API, on both backends: system writes, searches by patient, status and date, and
what a patient-bound token may do with them (read its own, create only its own callback
request, nothing else)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from scanwatch import care_plan, ids

HEADERS = {"Content-Type": "application/fhir+json"}
ALICE, BOB = ids.patient_id("HOSP", "ALICE"), ids.patient_id("HOSP", "BOB")
DAY = datetime(2025, 3, 1, 9, tzinfo=UTC)
PATIENT_SCOPES = "patient/*.read patient/CommunicationRequest.write"


def _create(client: TestClient, resource: dict) -> dict:
    created = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=HEADERS)
    assert created.status_code == 201, created.text
    return created.json()


def _ids(client: TestClient, path: str, **headers: str) -> list[str]:
    found = client.get(path, headers=headers)
    assert found.status_code == 200, (path, found.text)
    return [e["resource"]["id"] for e in found.json().get("entry", [])]


def _seed(client: TestClient) -> dict[str, dict[str, str]]:
    """Per patient: an active and a stopped prescription, a past, a booked and a cancelled
    visit; returns their ids by name."""
    made: dict[str, dict[str, str]] = {}
    for patient in (ALICE, BOB):
        made[patient] = {
            "active": _create(
                client,
                care_plan.medication_request(
                    patient, medication="A", dosage="once", authored_on=DAY
                ),
            )["id"],
            "stopped": _create(
                client,
                care_plan.medication_request(
                    patient,
                    medication="B",
                    dosage="twice",
                    authored_on=DAY - timedelta(days=30),
                    status="stopped",
                ),
            )["id"],
        }
        for name, days, status in (
            ("past", -10, "fulfilled"),
            ("soon", 5, "booked"),
            ("later", 20, "booked"),
            ("off", 7, "cancelled"),
        ):
            made[patient][name] = _create(
                client,
                care_plan.appointment(
                    patient,
                    start=DAY + timedelta(days=days),
                    minutes=30,
                    description=name,
                    status=status,
                ),
            )["id"]
    return made


def test_system_writes_and_searches_by_patient_status_and_date(client: TestClient) -> None:
    made = _seed(client)[ALICE]
    assert _ids(client, f"/fhir/MedicationRequest?patient={ALICE}&status=active") == [
        made["active"]
    ]
    assert set(_ids(client, f"/fhir/MedicationRequest?patient=Patient/{ALICE}")) == {
        made["active"],
        made["stopped"],
    }
    assert _ids(client, f"/fhir/MedicationRequest?patient={ALICE}&date=lt2025-02-15") == [
        made["stopped"]
    ]
    # The next booked visit: the chatbot's question.
    after = (DAY + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    upcoming = f"/fhir/Appointment?patient={ALICE}&status=booked&date=ge{after}&_sort=date"
    assert _ids(client, upcoming) == [made["soon"], made["later"]]
    assert _ids(client, f"/fhir/Appointment?patient={ALICE}&_sort=-date")[0] == made["later"]
    assert _ids(client, f"/fhir/Appointment?patient={ALICE}&date=2025-02-19") == [made["past"]]
    read = client.get(f"/fhir/Appointment/{made['soon']}").json()
    assert read["participant"][0]["actor"]["reference"] == f"Patient/{ALICE}"


def test_an_appointment_belongs_to_one_patient(client: TestClient) -> None:
    two = care_plan.appointment(
        ALICE,
        start=DAY,
        minutes=15,
        description="x",
        with_whom={"reference": f"Patient/{BOB}"},
    )
    refused = client.post("/fhir/Appointment", json=two, headers=HEADERS)
    assert refused.status_code == 422
    assert refused.json()["resourceType"] == "OperationOutcome"


def test_a_patient_reads_only_their_own_care_plan(
    client: TestClient, issue: Callable[..., str]
) -> None:
    made = _seed(client)
    mine = {"Authorization": f"Bearer {issue(PATIENT_SCOPES, patient=ALICE)}"}
    for resource_type, names in (
        ("MedicationRequest", ("active", "stopped")),
        ("Appointment", ("past", "soon", "later", "off")),
    ):
        theirs = {made[BOB][n] for n in names}
        assert set(_ids(client, f"/fhir/{resource_type}", **mine)) == {
            made[ALICE][n] for n in names
        }
        assert _ids(client, f"/fhir/{resource_type}?patient={BOB}", **mine) == []
        for other in theirs:
            assert client.get(f"/fhir/{resource_type}/{other}", headers=mine).status_code == 403


def test_a_patient_creates_only_their_own_callback_request(
    client: TestClient, issue: Callable[..., str]
) -> None:
    token = issue(PATIENT_SCOPES, patient=ALICE)
    mine = {**HEADERS, "Authorization": f"Bearer {token}"}
    request = care_plan.callback_request(ALICE, authored_on=DAY, reason="about my MRI", key="k1")
    created = client.post("/fhir/CommunicationRequest", json=request, headers=mine)
    assert created.status_code == 201, created.text
    assert created.json()["subject"]["reference"] == f"Patient/{ALICE}"
    # A retried create with its key records it once.
    condition = f"identifier={ids.CALLBACK_REQUEST_ID_SYSTEM}|k1"
    again = client.post(
        "/fhir/CommunicationRequest", json=request, headers={**mine, "If-None-Exist": condition}
    )
    assert again.status_code == 200 and again.json()["id"] == created.json()["id"]
    # Never for someone else, never as someone else, never another type, never an update.
    for_bob = care_plan.callback_request(BOB, authored_on=DAY)
    as_bob = request | {"requester": {"reference": f"Patient/{BOB}"}}
    prescription = care_plan.medication_request(ALICE, medication="x", dosage="y", authored_on=DAY)
    for body in (for_bob, as_bob, prescription):
        refused = client.post(f"/fhir/{body['resourceType']}", json=body, headers=mine)
        assert refused.status_code == 403, body
    path = f"/fhir/CommunicationRequest/{created.json()['id']}"
    update = created.json() | {"status": "revoked"}
    assert client.put(path, json=update, headers=mine).status_code == 403
    assert client.delete(path, headers=mine).status_code == 403
    # A read-only patient token may not create even its own.
    read_only = {**HEADERS, "Authorization": f"Bearer {issue('patient/*.read', patient=ALICE)}"}
    assert (
        client.post("/fhir/CommunicationRequest", json=request, headers=read_only).status_code
        == 403
    )
    # The console lists them by category; Bob sees none of Alice's.
    category = f"{care_plan.COMMUNICATION_CATEGORY_SYSTEM}|{care_plan.CALLBACK_CODE}"
    listed = _ids(client, f"/fhir/CommunicationRequest?category={category}&status=active")
    assert listed == [created.json()["id"]]
    bob = {"Authorization": f"Bearer {issue(PATIENT_SCOPES, patient=BOB)}"}
    assert _ids(client, "/fhir/CommunicationRequest", **bob) == []
    assert client.get(path, headers=bob).status_code == 403
