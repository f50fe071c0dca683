"""The CapabilityStatement tells the truth: walk it and exercise every advertised interaction,
search parameter, _include and _revinclude for every resource type."""

from __future__ import annotations

from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class

HEADERS = {"Content-Type": "application/fhir+json"}
MINIMAL = {
    "Patient": {"resourceType": "Patient"},
    "Practitioner": {"resourceType": "Practitioner", "active": True},
    "Device": {"resourceType": "Device"},
    "ImagingStudy": {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p"},
    },
    "Observation": {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2025-01-01T00:00:00Z",
    },
    "DiagnosticReport": {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p"},
    },
    "MedicationRequest": {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "x"},
        "subject": {"reference": "Patient/p"},
        "authoredOn": "2025-01-01T00:00:00Z",
    },
    "Appointment": {
        "resourceType": "Appointment",
        "status": "booked",
        "start": "2025-01-01T10:00:00Z",
        "end": "2025-01-01T10:30:00Z",
        "participant": [{"actor": {"reference": "Patient/p"}, "status": "accepted"}],
    },
    "CommunicationRequest": {
        "resourceType": "CommunicationRequest",
        "status": "active",
        "subject": {"reference": "Patient/p"},
        "authoredOn": "2025-01-01T00:00:00Z",
    },
    "Provenance": {
        "resourceType": "Provenance",
        "target": [{"reference": "Patient/p"}],
        "recorded": "2025-01-01T00:00:00Z",
        "agent": [{"who": {"display": "scanwatch"}}],
    },
    "Subscription": {
        "resourceType": "Subscription",
        "status": "off",
        "reason": "test",
        "criteria": "Observation?status=final",
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"},
    },
}
VALUES = {"reference": "Patient/p", "token": "x", "date": "ge2020-01-01"}


def test_walk_the_capability_statement(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    get_fhir_model_class("CapabilityStatement").model_validate(statement)
    rest = statement["rest"][0]
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    token_url = rest["security"]["extension"][0]["extension"][0]["valueUri"]
    assert client.post(token_url.replace("http://testserver", ""), content=b"").status_code == 400
    advertised = {entry["type"] for entry in rest["resource"]}
    assert advertised == set(MINIMAL)
    for entry in rest["resource"]:
        resource_type = entry["type"]
        codes = {i["code"] for i in entry["interaction"]}
        resource = dict(MINIMAL[resource_type])
        results: dict[str, int] = {}
        if "create" in codes:
            created = client.post(f"/fhir/{resource_type}", json=resource, headers=HEADERS)
            results["create"] = created.status_code
            resource = created.json()
            path = f"/fhir/{resource_type}/{resource['id']}"
        if "update" in codes:
            updated = dict(resource, id=resource["id"], language="en")
            results["update"] = client.put(path, json=updated, headers=HEADERS).status_code
        if "read" in codes:
            results["read"] = client.get(path).status_code
        if "vread" in codes:
            results["vread"] = client.get(f"{path}/_history/1").status_code
        if "history-instance" in codes:
            results["history-instance"] = client.get(f"{path}/_history").status_code
        if "history-type" in codes:
            results["history-type"] = client.get(f"/fhir/{resource_type}/_history").status_code
        if "search-type" in codes:
            results["search-type"] = client.get(f"/fhir/{resource_type}").status_code
            for param in entry.get("searchParam", []):
                value = VALUES[param["type"]]
                if param["name"] == "target":
                    value = "Patient/p"
                response = client.get(f"/fhir/{resource_type}", params={param["name"]: value})
                results[f"search:{param['name']}"] = response.status_code
            for include in entry.get("searchInclude", []):
                response = client.get(f"/fhir/{resource_type}", params={"_include": include})
                results[f"_include:{include}"] = response.status_code
            for revinclude in entry.get("searchRevInclude", []):
                response = client.get(f"/fhir/{resource_type}", params={"_revinclude": revinclude})
                results[f"_revinclude:{revinclude}"] = response.status_code
        if "delete" in codes:
            results["delete"] = client.delete(path).status_code
            results["read-after-delete"] = client.get(path).status_code
        expected = {key: 200 for key in results} | {
            "create": 201,
            "delete": 204,
            "read-after-delete": 410,
        }
        assert results == {k: expected[k] for k in results}, resource_type
        assert set(codes) <= {k.split(":")[0] for k in results} | {"search-type"}
