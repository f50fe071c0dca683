"""Authorization: every route needs a valid token with the right scope; patient-bound tokens
never see another patient; the token endpoint and the CLI; the audit trail."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from inference_worker.fhir_resources import resources_for
from scanwatch import ids
from services.auth.routes import JWKS_MAX_AGE_S, JWKS_PATH, WELL_KNOWN_JWKS_PATH
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.models import AuditEvent
from services.fhir_api.tests.test_search import scored, write

HEADERS = {"Content-Type": "application/fhir+json"}


def _routes(observation: dict) -> list[tuple[str, str, str]]:
    """(method, path, scope that allows it) of every FHIR route."""
    oid = observation["id"]
    return [
        ("GET", "/fhir/Observation", "system/Observation.read"),
        ("GET", f"/fhir/Observation/{oid}", "system/Observation.read"),
        ("GET", f"/fhir/Observation/{oid}/_history", "system/Observation.read"),
        ("GET", f"/fhir/Observation/{oid}/_history/1", "system/Observation.read"),
        ("GET", "/fhir/Observation/_history", "system/Observation.read"),
        ("PUT", f"/fhir/Observation/{oid}", "system/Observation.write"),
        ("POST", "/fhir/Observation", "system/Observation.write"),
        ("DELETE", f"/fhir/Observation/{oid}", "system/Observation.write"),
        ("PATCH", f"/fhir/Observation/{oid}", "system/*.*"),
    ]


def call(client: TestClient, method: str, path: str, token: str | None, body: dict) -> int:
    headers = dict(HEADERS)
    headers["Authorization"] = f"Bearer {token}" if token else ""
    if token is None:
        headers.pop("Authorization")
    return client.request(
        method, path, headers=headers, json=body if method in ("PUT", "POST") else None
    ).status_code


def test_every_route_refuses_missing_expired_and_wrong_scope_tokens(
    client: TestClient, issue: Callable[..., str]
) -> None:
    observation = write(client, scored("7.1"))
    client.headers.pop("Authorization")
    expired = issue("system/*.read system/*.write", lifetime=timedelta(seconds=-120))
    forged = issue("system/*.read").rsplit(".", 1)[0] + ".AAAA"
    wrong = issue("system/Device.read system/Device.write")
    # Every route the app has (FastAPI's own description of its routes, not /openapi.json).
    routes = get_openapi(title="routes", version="0", routes=client.app.routes)["paths"]
    fhir_paths = {path for path in routes if path.startswith("/fhir")}
    public = {"/fhir/metadata", "/fhir/.well-known/smart-configuration"}
    covered = {
        "/fhir/{resource_type}",
        "/fhir/{resource_type}/{resource_id}",
        "/fhir/{resource_type}/{resource_id}/_history",
        "/fhir/{resource_type}/{resource_id}/_history/{version_id}",
        "/fhir/{resource_type}/_history",
        "/fhir",
        "/fhir/{path}",
    }
    assert fhir_paths - public <= covered, fhir_paths - public - covered
    for method, path, _scope in _routes(observation):
        for token, status in ((None, 401), (expired, 401), (forged, 401), ("junk", 401)):
            assert call(client, method, path, token, observation) == status, (method, path, token)
        response = client.request(method, path, headers={"Authorization": "Basic abc"})
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        if method != "PATCH":
            assert call(client, method, path, wrong, observation) == 403, (method, path)
    assert client.get("/fhir/metadata").status_code == 200


def test_read_scope_cannot_write_and_write_scope_cannot_read(
    client: TestClient, issue: Callable[..., str]
) -> None:
    observation = write(client, scored("7.2"))
    path = f"/fhir/Observation/{observation['id']}"
    reader = issue("system/*.read")
    writer = issue("system/*.write")
    assert call(client, "GET", path, reader, observation) == 200
    assert call(client, "PUT", path, reader, observation) == 403
    assert call(client, "PUT", path, writer, observation) == 200
    assert call(client, "GET", path, writer, observation) == 403


def test_patient_token_sees_only_its_patient(client: TestClient, issue: Callable[..., str]) -> None:
    mine = write(client, scored("8.1", "ME"))
    theirs = write(client, scored("8.2", "THEM"))
    me = ids.patient_id("HOSP", "ME")
    them = ids.patient_id("HOSP", "THEM")
    token = issue("patient/Observation.read", patient=me)
    headers = {"Authorization": f"Bearer {token}"}
    found = client.get("/fhir/Observation", headers=headers).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [mine["id"]]
    assert "entry" not in client.get(f"/fhir/Observation?patient={them}", headers=headers).json()
    assert client.get(f"/fhir/Observation/{mine['id']}", headers=headers).status_code == 200
    for path in (
        f"/fhir/Observation/{theirs['id']}",
        f"/fhir/Observation/{theirs['id']}/_history",
        f"/fhir/Observation/{theirs['id']}/_history/1",
        "/fhir/Observation/_history",
        "/fhir/Observation?_include=Observation:device",
        f"/fhir/Patient/{me}",
        "/fhir/Device",
    ):
        assert client.get(path, headers=headers).status_code == 403, path
    put = client.put(f"/fhir/Observation/{mine['id']}", json=mine, headers=headers | HEADERS)
    assert put.status_code == 403
    unbound = issue("patient/Observation.read")  # no patient claim: grants nothing
    assert (
        client.get("/fhir/Observation", headers={"Authorization": f"Bearer {unbound}"}).status_code
        == 403
    )


def test_token_endpoint_client_credentials(settings: Settings, client: TestClient) -> None:
    from services.auth import clients as auth

    engine = client.app.state.store.engine
    secret = auth.register_client(engine, "ehr-1", "system/*.read")
    basic = base64.b64encode(f"ehr-1:{secret}".encode()).decode()
    answer = client.post(
        "/auth/token",
        content="grant_type=client_credentials&scope=system/Observation.read",
        headers={
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()
    assert token["token_type"] == "bearer" and token["scope"] == "system/Observation.read"
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert client.get("/fhir/Observation", headers=bearer).status_code == 200
    assert client.get("/fhir/Device", headers=bearer).status_code == 403
    form = "application/x-www-form-urlencoded"
    for body, status, error in (
        ("grant_type=password", 400, "unsupported_grant_type"),
        ("grant_type=client_credentials", 401, "invalid_client"),
        ("grant_type=client_credentials&client_id=ehr-1&client_secret=no", 401, "invalid_client"),
        (
            f"grant_type=client_credentials&client_id=ehr-1&client_secret={secret}"
            "&scope=system/*.write",
            400,
            "invalid_scope",
        ),
    ):
        response = client.post(
            "/auth/token", content=body, headers={"Content-Type": form, "Authorization": ""}
        )
        assert response.status_code == status and response.json()["error"] == error, body
    patient_secret = auth.register_client(engine, "portal-1", "patient/Observation.read", "p-1")
    response = client.post(
        "/auth/token",
        content=f"grant_type=client_credentials&client_id=portal-1&client_secret={patient_secret}",
        headers={"Content-Type": form, "Authorization": ""},
    )
    assert response.json()["patient"] == "p-1"
    with pytest.raises(ValueError, match="patient"):
        auth.register_client(engine, "portal-2", "patient/Observation.read")
    smart = client.get("/fhir/.well-known/smart-configuration").json()
    assert smart["token_endpoint"] == "http://testserver/auth/token"


def test_reads_are_audited_without_phi(client: TestClient) -> None:
    observation = write(client, scored("9.1", "AUDITED"))
    client.get(f"/fhir/Observation/{observation['id']}")
    client.get("/fhir/Observation?identifier=urn:mrn|SECRET-MRN&_count=5")
    with Session(client.app.state.store.engine) as session:
        events = session.exec(select(AuditEvent).order_by(AuditEvent.pk)).all()
    assert [(e.interaction, e.resource_type, e.status) for e in events] == [
        ("read", "Observation", 200),
        ("search-type", "Observation", 200),
    ]
    assert events[0].resource_id == observation["id"] and events[0].client_id == "test-client"
    assert events[1].parameters == "_count,identifier"
    dumped = json.dumps([e.model_dump(mode="json") for e in events])
    assert "SECRET-MRN" not in dumped and "AUDITED" not in dumped


def test_an_id_that_names_nothing_is_not_audited(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An MRN sent as a Patient id (or any unknown id) reaches neither the audit log nor the
    table: only ids of stored resources are recorded."""
    caplog.set_level(logging.INFO, logger="scanwatch.fhir.audit")
    observation = write(client, scored("9.2", "AUDITED-2"))
    assert client.get("/fhir/Patient/MRN-0042-SECRET").status_code == 404
    assert client.get("/fhir/Observation/MRN-0042-SECRET/_history").status_code == 404
    assert client.get(f"/fhir/Observation/{observation['id']}").status_code == 200
    with Session(client.app.state.store.engine) as session:
        events = session.exec(select(AuditEvent).order_by(AuditEvent.pk)).all()
    # (a history of nothing is refused before it is audited)
    assert [(e.status, e.resource_id) for e in events] == [(404, None), (200, observation["id"])]
    audit_lines = [r for r in caplog.records if r.name == "scanwatch.fhir.audit"]
    assert [getattr(r, "id", "missing") for r in audit_lines] == [None, observation["id"]]
    assert "MRN-0042" not in caplog.text


def test_cli_registers_clients_and_issues_tokens(
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    client: TestClient,
) -> None:
    import services.fhir_api.__main__ as entry

    monkeypatch.setattr(entry, "configure_logging", lambda *_args: None)
    monkeypatch.setenv("SCANWATCH_FHIR_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SCANWATCH_FHIR_SIGNING_KEYS_FILE", str(settings.signing_keys_file))
    monkeypatch.setenv("SCANWATCH_FHIR_AUTH_MODE", "required")
    assert entry.main(["register-client", "ehr-cli", "--scope", "system/*.read"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered["client_id"] == "ehr-cli" and len(registered["client_secret"]) > 30
    assert entry.main(["list-clients"]) == 0
    assert "ehr-cli" in capsys.readouterr().out
    assert (
        entry.main(
            [
                "issue-token",
                "--subject",
                "chatbot",
                "--scope",
                "patient/Observation.read",
                "--patient",
                "p-9",
            ]
        )
        == 0
    )
    token = capsys.readouterr().out.strip()
    grant = client.app.state.tokens.verify(token)
    assert grant.patient == "p-9" and grant.client_id == "chatbot"
    assert entry.main(["issue-token", "--subject", "x", "--scope", "patient/Observation.read"]) == 2
    assert entry.main(["register-client", "bad id!", "--scope", "system/*.read"]) == 2
    observation = resources_for(scored("9.2"))[-1]
    assert observation["resourceType"] == "Observation"


def test_jwks_serves_the_public_keys_only(
    client: TestClient, issue: Callable[..., str], tmp_path: Path
) -> None:
    token = issue("patient/Observation.read", patient="p-1")
    client.headers.pop("Authorization")  # the keys are public: no token needed
    answers = [client.get(path) for path in (JWKS_PATH, WELL_KNOWN_JWKS_PATH)]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/jwk-set+json")
        assert answer.headers["cache-control"] == f"public, max-age={JWKS_MAX_AGE_S}"
    assert answers[0].json() == answers[1].json()
    published = answers[0].json()["keys"]
    assert [k["kid"] for k in published] == [jwt.get_unverified_header(token)["kid"]]
    for jwk in published:
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}, jwk
        assert "d" not in jwk
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
    # The published key is the one the token verifies with (and nothing private came along).
    key = jwt.PyJWK(published[0]).key
    assert jwt.decode(token, key, algorithms=["ES256"], audience="scanwatch-fhir-api")["patient"]
    assert not hasattr(key, "private_numbers")
    # Authorization off (tests only): no keys to publish.
    keys_file = tmp_path / "off" / "signing-keys.json"
    off = Settings(
        database_url=f"sqlite:///{tmp_path / 'off.db'}",
        signing_keys_file=keys_file,
        auth_mode="off",
    )
    with TestClient(create_app(off)) as open_client:
        assert open_client.get(JWKS_PATH).status_code == 404
    assert not keys_file.exists()


def test_cli_refuses_a_signing_key_set_others_may_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import services.fhir_api.__main__ as entry
    from services.auth.tokens import load_key_set

    keys_file = tmp_path / "signing-keys.json"
    load_key_set(keys_file)
    keys_file.chmod(0o640)
    caplog.clear()  # the set-up's own "created a new key set" (captured or not, by test order)
    monkeypatch.setattr(entry, "configure_logging", lambda *_args: None)
    monkeypatch.setenv("SCANWATCH_FHIR_DATABASE_URL", f"sqlite:///{tmp_path / 'fhir.db'}")
    monkeypatch.setenv("SCANWATCH_FHIR_SIGNING_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("SCANWATCH_FHIR_AUTH_MODE", "required")
    issue = ["issue-token", "--subject", "chatbot", "--scope", "system/*.read"]
    assert entry.main(issue) == 2
    assert entry.main(["serve"]) == 2  # before any worker starts or the database is touched
    assert not (tmp_path / "fhir.db").exists()
    assert [getattr(r, "error", None) for r in caplog.records] == [
        f"the signing key set {keys_file} holds private keys but other users may access it "
        "(mode 0640); chmod 600 it"
    ] * 2
    keys_file.chmod(0o600)
    assert entry.main(issue) == 0
