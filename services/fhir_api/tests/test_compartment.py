"""The patient compartment (services/fhir_api/compartment.py): the one rule, for every
resource type, checked against stored rows in SQL as well as in Python; and through the API,
a patient-bound token never crosses to another patient on read, search or history."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col

from inference_worker.fhir_resources import all_resources_for, patient_logical_id
from scanwatch import care_plan, ids
from scanwatch.database import make_engine
from services.auth.scopes import OPEN_GRANT, READ, WRITE, AuthError, Grant, Scope
from services.fhir_api import migrate
from services.fhir_api.compartment import Compartment, compartment_of, refuse_patient_write
from services.fhir_api.models import ResourceVersion
from services.fhir_api.resources import RESOURCE_TYPES
from services.fhir_api.search import SEARCH_PARAMS
from services.fhir_api.store import ResourceStore
from services.fhir_api.tests.test_search import HEADERS, scored

#: Types whose resources can be in a patient's compartment, as documented (written out here, not
#: imported, so that a type added to the rule without a test here fails); every other type's is
#: empty.
SUBJECT_MEMBERS = (
    "Observation",
    "ImagingStudy",
    "DiagnosticReport",
    "MedicationRequest",
    "CommunicationRequest",
)
MEMBER_TYPES = ("Patient", *SUBJECT_MEMBERS, "Appointment")


def patient_grant(patient: str | None = "p1", scope: str = "patient/*.read") -> Grant:
    return Grant("portal", (Scope.parse(scope),), patient)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResourceStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fhir.db'}")
    migrate.upgrade(engine)
    yield ResourceStore(engine)
    engine.dispose()


def _resource(resource_type: str, resource_id: str, subject: str | None) -> dict:
    """A resource whose compartment reference is ``subject``: its ``subject``, or for an
    Appointment its participant's actor."""
    resource: dict = {"resourceType": resource_type, "id": resource_id}
    if subject is not None and resource_type == "Appointment":
        resource["participant"] = [{"actor": {"reference": subject}, "status": "accepted"}]
    elif subject is not None:
        resource["subject"] = {"reference": subject}
    return resource


def test_resource_types_are_listed_once() -> None:
    assert set(SEARCH_PARAMS) == set(RESOURCE_TYPES)
    assert set(MEMBER_TYPES) <= set(RESOURCE_TYPES)


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_unrestricted_grants_have_no_compartment(resource_type: str) -> None:
    assert compartment_of(OPEN_GRANT, resource_type) is None
    system = Grant("ehr", (Scope.parse("system/*.read"), Scope.parse("patient/*.read")), "p1")
    assert compartment_of(system, resource_type) is None


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_the_rule_in_python_and_in_sql_agree(resource_type: str, store: ResourceStore) -> None:
    """Every combination of id and subject, written to the store: what ``contains`` accepts is
    exactly what ``clause`` finds, and that is the patient's compartment as documented."""
    rule = compartment_of(patient_grant(), resource_type)
    assert rule == Compartment(resource_type, "p1")
    assert rule.has_members == (resource_type in MEMBER_TYPES)
    cases = {
        "p1": None,
        "p2": None,
        "mine": "Patient/p1",
        "mine-absolute": "https://elsewhere.example/fhir/Patient/p1/_history/3",
        "theirs": "Patient/p2",
        "group": "Group/p1",
        "broken": "not a reference",
    }
    stored = {
        resource_id: store.put(_resource(resource_type, resource_id, subject)).stored
        for resource_id, subject in cases.items()
    }
    inside = {resource_id for resource_id, s in stored.items() if rule.contains(s)}
    expected = (
        {"p1"}
        if resource_type == "Patient"
        else {"mine", "mine-absolute"}
        if resource_type in MEMBER_TYPES
        else set()
    )
    assert inside == expected
    for resource_id, version in stored.items():
        if resource_id in expected:
            rule.check(version)
        else:
            with pytest.raises(AuthError) as refused:
                rule.check(version)
            assert refused.value.status == 403
    if not rule.has_members:
        with pytest.raises(AuthError) as refused:
            rule.clause()
        assert refused.value.status == 403
        return
    _total, found = store.search(
        resource_type, [rule.clause()], [col(ResourceVersion.pk)], 100, 0, None
    )
    assert {s.resource_id for s in found} == expected
    # A deletion is outside (its content is gone), except that a Patient's id still names it.
    store.delete(resource_type, "mine" if resource_type != "Patient" else "p1")
    deleted = store.read(resource_type, "mine" if resource_type != "Patient" else "p1")
    assert deleted is not None and deleted.deleted
    assert rule.contains(deleted) == (resource_type == "Patient")


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_scopes_decide_the_rule(resource_type: str) -> None:
    with pytest.raises(AuthError) as refused:
        compartment_of(patient_grant(scope="patient/Device.write"), "Observation")
    assert refused.value.status == 403
    with pytest.raises(AuthError):  # a patient/ scope without a patient grants nothing
        compartment_of(patient_grant(patient=None), resource_type)
    with pytest.raises(AuthError):
        refuse_patient_write(patient_grant(scope="patient/*.*"), resource_type)
    refuse_patient_write(OPEN_GRANT, resource_type)
    rule = compartment_of(patient_grant(scope="patient/*.*"), resource_type, WRITE)
    assert rule == Compartment(resource_type, "p1")
    assert compartment_of(patient_grant(scope="patient/*.*"), resource_type, READ) == rule


def test_a_patient_token_cannot_cross_to_another_patient(
    client: TestClient, issue: Callable[..., str]
) -> None:
    """Patient A's token, aimed at patient B's resources of every type in the compartment, on
    read, vread, search (with and without B's id) and history."""
    studies = scored("11.1", "ALICE"), scored("11.2", "BOB")
    now = datetime.now(UTC)
    written = [
        [
            *all_resources_for(study),
            *care_plan.sample_care_plan(
                patient_logical_id(study), prescribed=now, today=now.date()
            ),
            care_plan.callback_request(patient_logical_id(study), authored_on=now)
            | {"id": f"callback-{study.PatientID}"},
        ]
        for study in studies
    ]
    for resources in written:
        for resource in resources:
            path = f"/fhir/{resource['resourceType']}/{resource['id']}"
            assert client.put(path, json=resource, headers=HEADERS).status_code in (200, 201)
    alice, bob = ids.patient_id("HOSP", "ALICE"), ids.patient_id("HOSP", "BOB")
    token = issue("patient/*.read", patient=alice)
    headers = {"Authorization": f"Bearer {token}"}
    mine, theirs = ({r["resourceType"]: r["id"] for r in resources} for resources in written)
    for resource_type in MEMBER_TYPES:
        other = theirs[resource_type]
        for path in (
            f"/fhir/{resource_type}/{other}",
            f"/fhir/{resource_type}/{other}/_history/1",
            f"/fhir/{resource_type}/{other}/_history",
            f"/fhir/{resource_type}/_history",
        ):
            assert client.get(path, headers=headers).status_code == 403, path
        own = client.get(f"/fhir/{resource_type}/{mine[resource_type]}", headers=headers)
        assert own.status_code == 200, resource_type
        searches = [f"/fhir/{resource_type}", f"/fhir/{resource_type}?_id={other}"]
        if resource_type != "Patient":
            searches.append(f"/fhir/{resource_type}?patient={bob}")
        for path in searches:
            found = client.get(path, headers=headers)
            assert found.status_code == 200, path
            entries = found.json().get("entry", [])
            assert other not in {e["resource"]["id"] for e in entries}, path
        everything = client.get(f"/fhir/{resource_type}", headers=headers).json()["entry"]
        assert [e["resource"]["id"] for e in everything] == [mine[resource_type]]
    for resource_type in ("Device", "Provenance"):
        assert client.get(f"/fhir/{resource_type}", headers=headers).status_code == 403
        path = f"/fhir/{resource_type}/{theirs[resource_type]}"
        assert client.get(path, headers=headers).status_code == 403, path
