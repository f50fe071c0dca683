"""Search, history, vread, delete, includes and conditional create, on both backends."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import httpx
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class

from inference_worker.fhir_resources import ScoredSeries, ScoredStudy, resources_for
from scanwatch import ids

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON}


def scored(uid: str, patient: str = "P1", day: int = 1, p_normal: float = 0.3) -> ScoredStudy:
    return ScoredStudy(
        PatientID=patient,
        IssuerOfPatientID="HOSP",
        StudyInstanceUID=uid,
        series=ScoredSeries(f"{uid}.1", "MR", 10),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=10,
        model_name="m",
        model_version=1,
        class_names=("glioma", "normal"),
        probabilities=(1 - p_normal, p_normal),
        threshold=0.5,
        issued=datetime(2025, 3, day, 12, tzinfo=UTC),
        acquired=datetime(2025, 3, day, 8, 30),
    )


def write(client: TestClient, study: ScoredStudy) -> dict:
    for resource in resources_for(study):
        response = client.put(
            f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource, headers=HEADERS
        )
        assert response.status_code in (200, 201), response.text
    return resources_for(study)[-1]


def ids_of(response: httpx.Response, mode: str = "match") -> list[str]:
    assert response.status_code == 200, response.text
    bundle = response.json()
    get_fhir_model_class("Bundle").model_validate(bundle)
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def test_observation_search_parameters(client: TestClient) -> None:
    o1 = write(client, scored("1.1", "P1", day=1))
    o2 = write(client, scored("1.2", "P1", day=5))
    o3 = write(client, scored("1.3", "P2", day=10))
    p1 = ids.patient_id("HOSP", "P1")
    get = lambda q: ids_of(client.get(f"/fhir/Observation?{q}"))  # noqa: E731
    assert set(get(f"patient={p1}")) == {o1["id"], o2["id"]}
    assert set(get(f"subject=Patient/{p1}")) == {o1["id"], o2["id"]}
    code = "urn:scanwatch:codesystem:mri-ai|anomaly-score"
    assert len(get(f"code={code}")) == 3
    assert len(get("code=anomaly-score")) == 3
    assert get("code=other|anomaly-score") == []
    assert len(get("category=imaging")) == 3
    assert len(get("status=preliminary")) == 3 and get("status=final") == []
    assert get(f"identifier={ids.OBSERVATION_ID_SYSTEM}|{o2['id']}") == [o2["id"]]
    assert get("date=2025-03-05") == [o2["id"]]
    assert get("date=eq2025-03-05") == [o2["id"]]
    assert set(get("date=ge2025-03-05")) == {o2["id"], o3["id"]}
    assert set(get("date=gt2025-03-05")) == {o3["id"]}
    assert set(get("date=le2025-03-05")) == {o1["id"], o2["id"]}
    assert set(get("date=lt2025-03-05")) == {o1["id"]}
    assert set(get("date=ge2025-03-02&date=lt2025-03-06")) == {o2["id"]}
    assert set(get("date=ge2025-03-05T08:30:00Z")) == {o2["id"], o3["id"]}
    assert get("date=gt2025-03-05T08:30:00Z") == [o3["id"]]
    now = datetime.now(UTC)
    assert (
        len(get(f"_lastUpdated=ge{(now - timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}")) == 3
    )
    assert get(f"_lastUpdated=lt{(now - timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}") == []
    assert get(f"_id={o1['id']},{o3['id']}&_sort=date") == [o1["id"], o3["id"]]
    # _sort: several keys, '-' for descending
    assert get("_sort=-date") == [o3["id"], o2["id"], o1["id"]]
    assert get("_sort=date") == [o1["id"], o2["id"], o3["id"]]
    assert get(f"patient={p1}&_sort=-date,_id") == [o2["id"], o1["id"]]
    by_id = sorted([o1["id"], o2["id"], o3["id"]])
    assert get("_sort=_id") == by_id
    assert get("_sort=-_id") == by_id[::-1]


def test_paging_links_walk_every_result(client: TestClient) -> None:
    written = {write(client, scored(f"2.{i}", "P3", day=i + 1))["id"] for i in range(5)}
    url = "/fhir/Observation?_sort=date&_count=2"
    seen: list[str] = []
    pages = 0
    while url:
        bundle = client.get(url).json()
        assert bundle["total"] == 5  # counted on full pages and on the last, partial one
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        if pages:
            assert "previous" in links
        url = links.get("next", "").replace("http://testserver", "")
        pages += 1
    assert pages == 3 and len(seen) == 5 and set(seen) == written
    # One page holds every match: the total is its length, and so is _total=accurate's.
    for total in ("estimate", "accurate"):
        whole = client.get(f"/fhir/Observation?_sort=date&_count=10&_total={total}").json()
        assert whole["total"] == len(whole["entry"]) == 5
    back = client.get("/fhir/Observation?_sort=date&_count=2&_offset=4").json()
    previous = {link["relation"]: link["url"] for link in back["link"]}["previous"]
    assert "_offset=2" in previous


def test_count_zero_total_and_caps(client: TestClient) -> None:
    write(client, scored("3.1"))
    bundle = client.get("/fhir/Observation?_count=0").json()
    assert bundle["total"] == 1 and "entry" not in bundle
    assert "total" not in client.get("/fhir/Observation?_total=none").json()
    link = client.get("/fhir/Observation?_count=100000").json()["link"][0]["url"]
    assert link.endswith("_count=50")


def test_include_device_and_revinclude_provenance(client: TestClient) -> None:
    observation = write(client, scored("4.1"))
    provenance = {
        "resourceType": "Provenance",
        "id": "prov-1",
        "target": [{"reference": f"Observation/{observation['id']}"}],
        "recorded": "2025-03-01T12:00:00Z",
        "agent": [{"who": {"reference": observation["device"]["reference"]}}],
    }
    assert (
        client.put("/fhir/Provenance/prov-1", json=provenance, headers=HEADERS).status_code == 201
    )
    response = client.get(
        f"/fhir/Observation?_id={observation['id']}&_include=Observation:device"
        "&_revinclude=Provenance:target"
    )
    assert ids_of(response) == [observation["id"]]
    included = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in response.json()["entry"]
        if e["search"]["mode"] == "include"
    }
    assert included == {observation["device"]["reference"], "Provenance/prov-1"}
    plain = client.get(f"/fhir/Observation?_id={observation['id']}")
    assert len(plain.json()["entry"]) == 1
    assert ids_of(client.get(f"/fhir/Provenance?target=Observation/{observation['id']}")) == [
        "prov-1"
    ]


def test_imaging_study_and_diagnostic_report_search(client: TestClient) -> None:
    write(client, scored("5.1", "P5"))
    write(client, scored("5.2", "P6"))
    p5 = ids.patient_id("HOSP", "P5")
    study_id = ids.imaging_study_id("5.1")
    assert ids_of(client.get(f"/fhir/ImagingStudy?patient={p5}")) == [study_id]
    assert ids_of(
        client.get(f"/fhir/ImagingStudy?identifier={ids.DICOM_UID_SYSTEM}|urn:oid:5.1")
    ) == [study_id]
    report = {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "identifier": [{"system": "urn:test", "value": "R1"}],
        "status": "preliminary",
        "code": {"coding": [{"system": "urn:test", "code": "ai"}]},
        "subject": {"reference": f"Patient/{p5}"},
        "effectiveDateTime": "2025-03-01T08:30:00Z",
    }
    assert (
        client.put("/fhir/DiagnosticReport/dr-1", json=report, headers=HEADERS).status_code == 201
    )
    assert ids_of(client.get(f"/fhir/DiagnosticReport?patient={p5}")) == ["dr-1"]
    assert ids_of(client.get("/fhir/DiagnosticReport?identifier=urn:test|R1")) == ["dr-1"]
    assert ids_of(client.get("/fhir/DiagnosticReport?identifier=urn:test|R2")) == []


def test_history_vread_delete_and_gone(client: TestClient) -> None:
    first = write(client, scored("6.1", p_normal=0.3))
    write(client, scored("6.1", p_normal=0.9))
    path = f"/fhir/Observation/{first['id']}"
    history = client.get(f"{path}/_history").json()
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    v1 = client.get(f"{path}/_history/1")
    assert v1.status_code == 200 and v1.json()["valueQuantity"]["value"] == 0.7
    assert client.get(f"{path}/_history/9").status_code == 404
    assert client.get(f"{path}/_history/x").status_code == 400
    type_history = client.get("/fhir/Observation/_history").json()
    assert type_history["total"] == 2
    assert client.delete(path).status_code == 204
    gone = client.get(path)
    assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"{path}/_history/3").status_code == 410
    assert client.get(f"{path}/_history/2").status_code == 200
    assert ids_of(client.get(f"/fhir/Observation?_id={first['id']}")) == []
    assert client.delete("/fhir/Observation/never-was").status_code == 404
    # writing it again brings it back as a new version
    again = client.put(path, json=first, headers=HEADERS)
    assert again.status_code == 201 and again.headers["ETag"] == 'W/"4"'


def test_conditional_create_with_if_none_exist(client: TestClient) -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": "42"}],
    }
    condition = {"If-None-Exist": "identifier=urn:mrn|42", **HEADERS}
    created = client.post("/fhir/Patient", json=patient, headers=condition)
    assert created.status_code == 201, created.text
    new_id = created.json()["id"]
    assert created.headers["Location"].endswith(f"/Patient/{new_id}/_history/1")
    again = client.post("/fhir/Patient", json=patient, headers=condition)
    assert again.status_code == 200 and again.json()["id"] == new_id
    other = copy.deepcopy(patient) | {"gender": "female"}
    assert client.post("/fhir/Patient", json=other, headers=HEADERS).status_code == 201
    ambiguous = client.post("/fhir/Patient", json=patient, headers=condition)
    assert ambiguous.status_code == 412
    bad = client.post("/fhir/Patient", json=patient, headers={**HEADERS, "If-None-Exist": "x=1"})
    assert bad.status_code == 400


def test_rejects_bad_values_and_hostile_parameters_cleanly(client: TestClient) -> None:
    for query in (
        "date=xx2025",
        "date=2025-13-45",
        "date=ne2025",
        "_sort=colour",
        "_count=abc",
        "_include=Observation:encounter",
        "_revinclude=AuditEvent:entity",
        "code:text=x",
        "patient=' OR 1=1 --",
        "identifier=%00",
        "patient=" + "a" * 5000,
        "_total=maybe",
        "code=" + ",".join(["x"] * 100),
    ):
        response = client.get(f"/fhir/Observation?{query}")
        assert response.status_code == 400, (query, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    # injection-shaped values that are valid tokens simply match nothing
    assert ids_of(client.get("/fhir/Observation?code=x' OR '1'='1")) == []


def test_content_negotiation(client: TestClient) -> None:
    assert (
        client.get("/fhir/metadata", headers={"Accept": "application/fhir+json"}).status_code == 200
    )
    assert client.get("/fhir/metadata", headers={"Accept": "application/json"}).status_code == 200
    assert (
        client.get("/fhir/Observation", headers={"Accept": "application/fhir+xml"}).status_code
        == 406
    )
    assert client.get("/fhir/Observation?_format=xml").status_code == 406
    assert client.get("/fhir/Observation?_format=json").status_code == 200
