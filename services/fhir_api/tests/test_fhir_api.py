"""The FHIR API over SQLite and PostgreSQL (fixtures in conftest.py), driven through FastAPI's
TestClient with the resources the worker writes
(:func:`inference_worker.fhir_resources.resources_for`)."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import func
from sqlmodel import Session, col, select

from inference_worker.fhir_resources import ScoredSeries, ScoredStudy, resources_for
from scanwatch import ids
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.models import ResourceVersion
from services.fhir_api.resources import without_server_meta

FHIR_JSON = "application/fhir+json"
MODEL = "brain-mri-anomaly"


def study(study_uid: str, patient_id: str = "PID-A", p_normal: float = 0.3) -> ScoredStudy:
    return ScoredStudy(
        PatientID=patient_id,
        IssuerOfPatientID="HOSP",
        PatientName="Doe^Jane",
        PatientSex="F",
        StudyInstanceUID=study_uid,
        series=ScoredSeries(f"{study_uid}.1", "MR", 20, "AX T2"),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=20,
        model_name=MODEL,
        model_version=1,
        class_names=("glioma", "normal"),
        probabilities=(1.0 - p_normal, p_normal),
        threshold=0.5,
        issued=datetime(2025, 3, 4, 9, 0, tzinfo=UTC),
        acquired=datetime(2025, 3, 4, 8, 30),
    )


def put(client: TestClient, resource: dict, **headers: str) -> httpx.Response:
    return client.put(
        f"/fhir/{resource['resourceType']}/{resource['id']}",
        json=resource,
        headers={"Content-Type": FHIR_JSON, **headers},
    )


def put_study(client: TestClient, scored: ScoredStudy) -> dict:
    """Write a study's resources; return its Observation."""
    resources = resources_for(scored)
    for resource in resources:
        assert put(client, resource).status_code in (200, 201)
    return resources[-1]


def version_count(client: TestClient, resource_type: str, resource_id: str) -> int:
    with Session(client.app.state.store.engine) as session:
        return session.exec(
            select(func.count()).where(
                col(ResourceVersion.resource_type) == resource_type,
                col(ResourceVersion.resource_id) == resource_id,
            )
        ).one()


def assert_outcome(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    outcome = response.json()
    get_fhir_model_class("OperationOutcome").model_validate(outcome)
    text = " ".join(issue.get("diagnostics", "") for issue in outcome["issue"])
    for word in words:
        assert word in text, text
    return outcome


def test_put_then_read_back_every_resource(client: TestClient) -> None:
    for resource in resources_for(study("1.2.3.1")):
        path = f"/fhir/{resource['resourceType']}/{resource['id']}"
        created = put(client, resource)
        assert created.status_code == 201, created.text
        assert created.headers["ETag"] == 'W/"1"'
        assert created.headers["Location"].endswith(f"{path}/_history/1")
        read = client.get(path)
        assert read.status_code == 200
        assert read.headers["content-type"].startswith(FHIR_JSON)
        assert read.headers["ETag"] == 'W/"1"'
        body = read.json()
        assert body["meta"]["versionId"] == "1"
        assert body["meta"]["lastUpdated"]
        assert without_server_meta(body) == resource
        get_fhir_model_class(resource["resourceType"]).model_validate(body)


def test_identical_put_is_idempotent(client: TestClient) -> None:
    observation = put_study(client, study("1.2.3.2"))
    again = copy.deepcopy(observation)
    # Server-owned meta sent back by a client must not count as a change.
    again["meta"] |= {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}
    response = put(client, again)
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"1"'
    assert response.json()["meta"]["versionId"] == "1"
    assert version_count(client, "Observation", observation["id"]) == 1


def test_changed_content_makes_version_two(client: TestClient) -> None:
    first = put_study(client, study("1.2.3.3", p_normal=0.3))
    changed = resources_for(study("1.2.3.3", p_normal=0.9))[-1]
    assert changed["id"] == first["id"]
    response = put(client, changed)
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'
    read = client.get(f"/fhir/Observation/{first['id']}").json()
    assert read["meta"]["versionId"] == "2"
    assert read["interpretation"][0]["coding"][0]["code"] == "N"
    assert version_count(client, "Observation", first["id"]) == 2


def test_if_none_match_gives_304(client: TestClient) -> None:
    observation = put_study(client, study("1.2.3.4"))
    path = f"/fhir/Observation/{observation['id']}"
    assert client.get(path, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(path, headers={"If-None-Match": 'W/"9"'}).status_code == 200


def test_search_by_patient_returns_only_that_patients_observations(client: TestClient) -> None:
    a1 = put_study(client, study("1.2.4.1", "PID-A"))
    put_study(client, study("1.2.4.2", "PID-B"))
    a2 = put_study(client, study("1.2.4.3", "PID-A"))
    patient_a = ids.patient_id("HOSP", "PID-A")

    for query in (
        f"patient={patient_a}",
        f"patient=Patient/{patient_a}",
        f"subject=Patient/{patient_a}",
        f"patient=http://testserver/fhir/Patient/{patient_a}",
    ):
        response = client.get(f"/fhir/Observation?{query}")
        assert response.status_code == 200, query
        assert response.headers["content-type"].startswith(FHIR_JSON)
        bundle = response.json()
        get_fhir_model_class("Bundle").model_validate(bundle)
        assert bundle["type"] == "searchset"
        assert bundle["total"] == 2
        assert [e["resource"]["id"] for e in bundle["entry"]] == [a2["id"], a1["id"]]  # newest
        for entry in bundle["entry"]:
            assert entry["search"]["mode"] == "match"
            assert (
                entry["fullUrl"] == f"http://testserver/fhir/Observation/{entry['resource']['id']}"
            )
            assert entry["resource"]["subject"]["reference"] == f"Patient/{patient_a}"
        assert bundle["link"][0]["relation"] == "self"

    one = client.get(f"/fhir/Observation?patient={patient_a}&_count=1").json()
    assert one["total"] == 2 and len(one["entry"]) == 1
    nobody = client.get("/fhir/Observation?patient=nobody").json()
    assert nobody["total"] == 0 and "entry" not in nobody
    either = client.get(f"/fhir/Observation?patient={patient_a},{ids.patient_id('HOSP', 'PID-B')}")
    assert either.json()["total"] == 3


def test_count_is_capped_at_max_count(client: TestClient) -> None:
    bundle = client.get("/fhir/Observation?patient=x&_count=100000").json()
    assert bundle["link"][0]["url"].endswith("_count=50")


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("POST", "/fhir", ["batch"]),
        ("PATCH", "/fhir/Observation/abc", ["patch"]),
    ],
)
def test_not_implemented_answers_501(
    client: TestClient, method: str, path: str, words: list[str]
) -> None:
    body = {"resourceType": "Bundle", "type": "batch", "entry": []}
    kwargs = {"json": body, "headers": {"Content-Type": FHIR_JSON}} if method == "POST" else {}
    assert_outcome(client.request(method, path, **kwargs), 501, "not implemented", *words)


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/fhir/Observation/absent", ["Observation/absent"]),
        ("/fhir/Encounter/x", ["Encounter", "not supported"]),
        ("/fhir/Bogus/x", ["unknown resource type"]),
        ("/elsewhere", []),
    ],
)
def test_unknown_answers_404(client: TestClient, path: str, words: list[str]) -> None:
    assert_outcome(client.get(path), 404, *words)


def test_bad_requests_answer_400(client: TestClient) -> None:
    observation = resources_for(study("1.2.6.1"))[-1]
    path = f"/fhir/Observation/{observation['id']}"
    headers = {"Content-Type": FHIR_JSON}
    assert_outcome(client.put(path, content=b"{not json", headers=headers), 400, "not JSON")
    assert_outcome(client.put(path, json=[1], headers=headers), 400, "JSON object")
    assert_outcome(
        client.put("/fhir/Observation/other-id", json=observation, headers=headers),
        400,
        "does not match the URL",
    )
    assert_outcome(
        client.put(f"/fhir/Patient/{observation['id']}", json=observation, headers=headers),
        400,
        "resourceType",
    )
    assert_outcome(client.put("/fhir/Observation/bad_id!", json={}, headers=headers), 400, "id")
    assert_outcome(client.get("/fhir/Observation?bogus=1"), 400, "unknown or unsupported")
    assert_outcome(client.get("/fhir/Observation?patient=x&_count=-1"), 400, "_count")
    assert_outcome(client.get("/fhir/Observation?patient=Device/x"), 400, "Patient reference")
    assert_outcome(
        client.put(path, content=b"{}", headers={"Content-Type": "text/plain"}), 415, "Content-Type"
    )


def test_invalid_resource_answers_422_naming_the_problem(client: TestClient) -> None:
    observation = resources_for(study("1.2.6.2"))[-1]
    observation["valueQuantity"]["value"] = "high"
    observation["colour"] = "red"
    outcome = assert_outcome(put(client, observation), 422, "valueQuantity", "colour")
    assert len(outcome["issue"]) == 2
    assert client.get(f"/fhir/Observation/{observation['id']}").status_code == 404


def test_concurrent_writes_of_one_resource_all_succeed(client: TestClient) -> None:
    """Different contents written at once: each becomes exactly one version, none fails."""
    writers = 6
    observations = [resources_for(study("1.2.7.1", p_normal=i / 10))[-1] for i in range(writers)]
    barrier = threading.Barrier(writers)
    statuses: list[int] = []

    def write(resource: dict) -> None:
        barrier.wait()
        statuses.append(put(client, resource).status_code)

    threads = [threading.Thread(target=write, args=(o,)) for o in observations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses) == [200] * (writers - 1) + [201]
    assert version_count(client, "Observation", observations[0]["id"]) == writers
    current = client.get(f"/fhir/Observation/{observations[0]['id']}").json()
    assert current["meta"]["versionId"] == str(writers)


def test_unhandled_error_is_a_500_operation_outcome(settings: Settings, client: TestClient) -> None:
    app = create_app(settings)

    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    with TestClient(
        app, raise_server_exceptions=False, headers=dict(client.headers)
    ) as test_client:
        app.state.store.read = broken
        assert_outcome(test_client.get("/fhir/Observation/abc"), 500, "internal error")


def test_healthz_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    client.get("/fhir/metadata")
    metrics = client.get("/metrics").text
    assert 'fhir_api_requests_total{method="GET",route="/fhir/metadata",status="200"}' in metrics


def test_settings_refuse_unsafe_or_inconsistent_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="max_count"):
        Settings(default_count=300, max_count=200)
    assert Settings().auth_mode == "required"  # 'off' is for tests, and loopback only
    with pytest.raises(ValueError, match="AUTH_MODE=required"):
        Settings(host="0.0.0.0", auth_mode="off")
    with pytest.raises(ValueError, match="database_url"):
        Settings(database_url="mysql://x")
    with pytest.raises(ValueError, match="auth_mode"):
        Settings(auth_mode="maybe")
    with pytest.raises(ValueError, match="bootstrap_clients"):
        Settings(bootstrap_clients="only-a-name")
    # Outside development the signing keys' file must be chosen (a container's working
    # folder is not kept, nor shared between instances).
    with pytest.raises(ValueError, match="SIGNING_KEYS_FILE"):
        Settings(host="0.0.0.0", auth_mode="required")
    keys = Path("/var/lib/scanwatch/signing-keys.json")
    served = Settings(host="0.0.0.0", auth_mode="required", signing_keys_file=keys)
    assert served.host == "0.0.0.0" and served.signing_keys_file == keys
    assert Settings().signing_keys_file == Path("var/auth/signing-keys.json")
    monkeypatch.setenv("SCANWATCH_FHIR_JWT_SECRET", "x" * 40)  # the HS256 secret of old
    with pytest.raises(ValueError, match="SCANWATCH_FHIR_JWT_SECRET is no longer read"):
        Settings()


def test_main_refuses_invalid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.fhir_api.__main__ as entry

    monkeypatch.setattr(entry, "configure_logging", lambda *_args: None)
    assert entry.main(["--port", "70000"]) == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # a SQLite setting
def test_sqlite_runs_in_wal_mode(client: TestClient) -> None:
    assert client.app.state.store.backend == "sqlite"
    with client.app.state.store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
