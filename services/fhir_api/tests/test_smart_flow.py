"""SMART standalone patient launch through the real app and a standard OAuth client
(Authlib's ``OAuth2Client`` over HTTP, PKCE S256): invite → activate → authorize → token →
read the patient's own Observation → refresh → revoke → refresh fails; the token reaches no
other patient; tokens issued before a key rotation keep verifying through the JWKS.

Runs on SQLite and PostgreSQL (the ``settings`` fixture): the migration that creates the
accounts, codes and refresh tokens is exercised on both."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import jwt
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from fastapi import FastAPI

from devtools.testing import served
from inference_worker.fhir_resources import resources_for
from services.auth.jwks import RemoteKeySet
from services.auth.tokens import TokenService, load_key_set, rotate
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.smart_helpers import (
    APP,
    REDIRECT_URI,
    SCOPE,
    activate_patient,
    patient_of,
    register_app,
    sign_in,
)
from services.fhir_api.tests.test_search import HEADERS, scored


@dataclass
class Server:
    app: FastAPI
    base: str  # http://127.0.0.1:<port>
    observations: dict[str, str]  # PatientID → its Observation id

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"


@pytest.fixture
def server(settings: Settings, issue: Callable[..., str]) -> Iterator[Server]:
    """The API served over HTTP, with an Observation for ALICE and one for BOB, the portal
    registered, and both patients' accounts activated."""
    app = create_app(settings)
    with served(app, 0) as port:
        base = f"http://127.0.0.1:{port}"
        system = {"Authorization": f"Bearer {issue('system/*.read system/*.write')}"}
        observations = {}
        with httpx.Client(base_url=base, headers=system) as writer:
            for uid, patient in (("21.1", "ALICE"), ("21.2", "BOB")):
                for resource in resources_for(scored(uid, patient)):
                    path = f"/fhir/{resource['resourceType']}/{resource['id']}"
                    answer = writer.put(path, json=resource, headers=HEADERS)
                    assert answer.status_code in (200, 201), answer.text
                observations[patient] = resource["id"]
        engine = app.state.store.engine
        register_app(engine)
        with httpx.Client(base_url=base) as browser:
            activate_patient(engine, browser, patient_of("ALICE"), "alice")
            activate_patient(engine, browser, patient_of("BOB"), "bob")
        yield Server(app, base, observations)


def oauth_client() -> OAuth2Client:
    return OAuth2Client(
        client_id=APP,
        token_endpoint_auth_method="none",
        redirect_uri=REDIRECT_URI,
        scope=SCOPE,
        code_challenge_method="S256",
    )


def sign_in_with_oauth_client(server: Server, username: str) -> tuple[OAuth2Client, dict]:
    """The standard client's authorization code flow, the browser part done over HTTP."""
    client = oauth_client()
    verifier = secrets.token_urlsafe(48)
    url, state = client.create_authorization_url(
        f"{server.base}/auth/authorize", code_verifier=verifier, aud=server.fhir
    )
    with httpx.Client(base_url=server.base) as browser:
        answer = sign_in(browser, url, username)
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(REDIRECT_URI) and f"state={state}" in location
    token = client.fetch_token(
        f"{server.base}/auth/token", authorization_response=location, code_verifier=verifier
    )
    return client, dict(token)


def read(server: Server, token: str, path: str) -> httpx.Response:
    return httpx.get(f"{server.fhir}/{path}", headers={"Authorization": f"Bearer {token}"})


def test_standalone_patient_launch_end_to_end(server: Server) -> None:
    client, token = sign_in_with_oauth_client(server, "alice")
    alice = patient_of("ALICE")
    assert token["patient"] == alice and token["token_type"].lower() == "bearer"
    assert set(token["scope"].split()) == set(SCOPE.split())
    # The access token is the project's: the FHIR API accepts it for the patient's own records.
    own = read(server, token["access_token"], f"Observation/{server.observations['ALICE']}")
    assert own.status_code == 200, own.text
    assert own.json()["subject"]["reference"] == f"Patient/{alice}"
    # The id_token: ES256 from the published keys, for this app, naming the patient.
    keys = httpx.get(f"{server.base}/auth/jwks").json()["keys"]
    header = jwt.get_unverified_header(token["id_token"])
    key = next(jwt.PyJWK(k).key for k in keys if k["kid"] == header["kid"])
    claims = jwt.decode(token["id_token"], key, algorithms=["ES256"], audience=APP)
    assert claims["iss"] == server.base and claims["fhirUser"] == f"Patient/{alice}"
    # Refresh: a new access token and a new refresh token; the old one is spent.
    refreshed = dict(
        client.refresh_token(f"{server.base}/auth/token", refresh_token=token["refresh_token"])
    )
    assert refreshed["refresh_token"] != token["refresh_token"]
    assert refreshed["patient"] == alice
    again = read(server, refreshed["access_token"], f"Observation/{server.observations['ALICE']}")
    assert again.status_code == 200
    # Sign-out: revoking the refresh token; refreshing with it fails afterwards.
    revoked = client.revoke_token(
        f"{server.base}/auth/revoke",
        token=refreshed["refresh_token"],
        token_type_hint="refresh_token",
    )
    assert revoked.status_code == 200
    after = httpx.post(
        f"{server.base}/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refreshed["refresh_token"],
            "client_id": APP,
        },
    )
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant"


def test_a_patients_token_from_sign_in_reaches_no_other_patient(server: Server) -> None:
    _client, token = sign_in_with_oauth_client(server, "alice")
    bob = patient_of("BOB")
    theirs = server.observations["BOB"]
    for path in (f"Observation/{theirs}", f"Observation/{theirs}/_history/1", f"Patient/{bob}"):
        assert read(server, token["access_token"], path).status_code == 403, path
    found = read(server, token["access_token"], f"Observation?patient={bob}").json()
    assert "entry" not in found
    mine = read(server, token["access_token"], "Observation").json()["entry"]
    assert [e["resource"]["id"] for e in mine] == [server.observations["ALICE"]]


def test_tokens_from_before_a_key_rotation_keep_verifying(
    server: Server, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Rotation without downtime: the signing key set gains a key; a server that loads the
    new set signs with it, and the tokens the previous key signed still verify, at the API and
    through the JWKS (as the chatbot's channel checks them)."""
    # A key set of this test's own (the session's is shared, read-only by convention).
    keys_file = tmp_path_factory.mktemp("rotation") / "signing-keys.json"
    keys_file.write_text(settings.signing_keys_file.read_text())
    keys_file.chmod(0o600)
    old_kid = load_key_set(keys_file).signing.kid
    _client, before = sign_in_with_oauth_client(server, "alice")
    assert jwt.get_unverified_header(before["access_token"])["kid"] == old_kid
    new_kid = rotate(keys_file).kid
    # The server picks the rotated set up (as a restarted or reloaded process would).
    server.app.state.tokens.keys = load_key_set(keys_file)
    _client, after = sign_in_with_oauth_client(server, "alice")
    assert jwt.get_unverified_header(after["access_token"])["kid"] == new_kid != old_kid
    assert jwt.get_unverified_header(after["id_token"])["kid"] == new_kid
    verifier = RemoteKeySet(f"{server.base}/auth/jwks")
    for token in (before, after):
        assert verifier.verify(token["access_token"]).patient == patient_of("ALICE")
        answer = read(server, token["access_token"], f"Observation/{server.observations['ALICE']}")
        assert answer.status_code == 200
    assert TokenService(load_key_set(keys_file)).verify(before["access_token"])
