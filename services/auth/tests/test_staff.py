"""Staff accounts and their OpenID Connect sign-in at a staff app (the console), through the
real authorization server (served by the FHIR API's app over HTTP, SQLite) and a standard
OAuth client (Authlib's, confidential, PKCE S256): create → activate (TOTP required) →
authorize → token → what the token says and may do, for each role; the refusals."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
import pyotp
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from devtools import cli
from devtools.browser import form_fields
from devtools.testing import served
from scanwatch import ids
from services.auth import accounts, clients
from services.auth.scopes import CLINICIAN_WRITES, ROLE_SCOPES, parse_scopes
from services.auth.server import staff_scopes
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

CONSOLE = "test-console"
CONSOLE_REDIRECT = "http://127.0.0.1:8100/auth/callback"
PORTAL = "test-portal"
PORTAL_REDIRECT = "http://127.0.0.1:8081/callback"
PASSWORD = "correct horse battery staple"


@dataclass
class Server:
    app: FastAPI
    base: str
    engine: Engine
    console_secret: str

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
        auth_mode="required",
        signing_keys_file=tmp_path / "keys.json",
    )
    app = create_app(settings)
    with served(app, 0) as port:
        engine = app.state.store.engine
        secret = clients.register_staff_app(
            engine, CONSOLE, [CONSOLE_REDIRECT], description="Staff console"
        )
        clients.register_app(engine, PORTAL, [PORTAL_REDIRECT], description="Patient portal")
        yield Server(app, f"http://127.0.0.1:{port}", engine, secret)


def activate_staff(server: Server, username: str, role: str) -> str:
    """Create the account, open its link and set password and TOTP; the TOTP secret."""
    token = accounts.create_staff(server.engine, username, role)
    with httpx.Client(base_url=server.base) as browser:
        page = browser.get(f"/auth/activate?{urlencode({'token': token})}")
        assert page.status_code == 200, page.text
        fields = form_fields(page.text)
        assert fields["username"] == username  # fixed at creation, shown read only
        fields.update(password=PASSWORD, password2=PASSWORD)
        # Staff must set up TOTP: without a code the page comes back with the reason.
        refused = browser.post("/auth/activate", data={**fields, "totp": ""})
        assert refused.status_code == 400 and "authenticator app" in refused.text
        fields = form_fields(refused.text)
        fields.update(password=PASSWORD, password2=PASSWORD)
        fields["totp"] = pyotp.TOTP(fields["totp_secret"]).now()
        done = browser.post("/auth/activate", data=fields)
        assert done.status_code == 200 and "Your account is ready" in done.text, done.text
    return fields["totp_secret"]


def next_code(secret: str) -> str:
    """A TOTP code not used yet (activation spent the current step's)."""
    totp = pyotp.TOTP(secret)
    return totp.at(datetime.now(UTC), counter_offset=1)


def console_client(server: Server) -> OAuth2Client:
    return OAuth2Client(
        client_id=CONSOLE,
        client_secret=server.console_secret,
        token_endpoint_auth_method="client_secret_basic",
        redirect_uri=CONSOLE_REDIRECT,
        scope=clients.STAFF_APP_SCOPES,
        code_challenge_method="S256",
    )


def sign_in_page(
    server: Server, client: OAuth2Client, username: str, password: str, totp: str
) -> tuple[httpx.Response, str, str]:
    """(the answer to the sign-in form, the state sent, the PKCE verifier)."""
    verifier = secrets.token_urlsafe(48)
    url, state = client.create_authorization_url(
        f"{server.base}/auth/authorize", code_verifier=verifier, aud=server.fhir
    )
    with httpx.Client(base_url=server.base) as browser:
        page = browser.get(url)
        assert page.status_code == 200, page.text
        fields = form_fields(page.text)
        fields.update(username=username, password=password, totp=totp, action="sign-in")
        return browser.post("/auth/authorize", data=fields), state, verifier


def staff_token(server: Server, username: str, totp_secret: str) -> dict[str, str]:
    client = console_client(server)
    answer, state, verifier = sign_in_page(
        server, client, username, PASSWORD, next_code(totp_secret)
    )
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(CONSOLE_REDIRECT) and f"state={state}" in location
    return dict(
        client.fetch_token(
            f"{server.base}/auth/token", authorization_response=location, code_verifier=verifier
        )
    )


def claims_of(server: Server, token: str, audience: str | None = None) -> dict[str, object]:
    keys = httpx.get(f"{server.base}/auth/jwks").json()["keys"]
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k).key for k in keys if k["kid"] == kid)
    options = {} if audience else {"verify_aud": False}
    return dict(jwt.decode(token, key, algorithms=["ES256"], audience=audience, options=options))


def test_role_scopes_are_the_contract() -> None:
    clinician = set(ROLE_SCOPES["clinician"])
    assert clinician == {"user/*.read", *(f"user/{t}.write" for t in CLINICIAN_WRITES)}
    assert set(CLINICIAN_WRITES) == {
        "Observation",
        "DiagnosticReport",
        "MedicationRequest",
        "Appointment",
        "CommunicationRequest",
        "Provenance",
    }
    operator = parse_scopes(" ".join(ROLE_SCOPES["operator"]))
    assert operator and all(s.access == "read" for s in operator)
    assert ROLE_SCOPES["admin"] == ()
    # Narrowing: whatever the app asks for, a role gets no more than its own.
    asked = parse_scopes("user/*.read user/*.write")
    assert {str(s) for s in staff_scopes(asked, ["operator"])} == set(ROLE_SCOPES["operator"])
    assert staff_scopes(parse_scopes("user/Observation.read"), ["clinician"]) == parse_scopes(
        "user/Observation.read"
    )
    assert staff_scopes(asked, []) == ()


def test_clinician_signs_in_at_the_console(server: Server) -> None:
    secret = activate_staff(server, "dr.grey", "clinician")
    token = staff_token(server, "dr.grey", secret)
    assert set(token["scope"].split()) == {
        "openid",
        "fhirUser",
        "offline_access",
        *ROLE_SCOPES["clinician"],
    }
    access = claims_of(server, token["access_token"])
    account = accounts.load_user(server.engine, str(access["sub"]))
    assert account is not None and account.roles == ("clinician",)
    assert access["sub"] != CONSOLE and "patient" not in access
    assert access["roles"] == ["clinician"]
    assert access["fhirUser"] == f"Practitioner/{account.account_id}"
    assert set(str(access["scope"]).split()) == set(ROLE_SCOPES["clinician"])
    id_token = claims_of(server, token["id_token"], audience=CONSOLE)
    assert id_token["sub"] == access["sub"] and id_token["roles"] == ["clinician"]
    assert id_token["fhirUser"] == access["fhirUser"]
    # The FHIR API takes it as a staff reader (user/*.read), of any patient.
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    found = httpx.get(f"{server.fhir}/Observation", headers=bearer)
    assert found.status_code == 200, found.text
    # Refreshed: still the person's token, with the role's scopes.
    refreshed = dict(
        console_client(server).refresh_token(
            f"{server.base}/auth/token", refresh_token=token["refresh_token"]
        )
    )
    again = claims_of(server, refreshed["access_token"])
    assert again["sub"] == access["sub"] and again["roles"] == ["clinician"]


def test_operator_and_admin_get_their_role_only(server: Server) -> None:
    operator = staff_token(server, "ops", activate_staff(server, "ops", "operator"))
    claims = claims_of(server, operator["access_token"])
    assert claims["roles"] == ["operator"] and "fhirUser" not in claims
    assert set(str(claims["scope"]).split()) == set(ROLE_SCOPES["operator"])
    bearer = {"Authorization": f"Bearer {operator['access_token']}"}
    # Reads what it needs, writes nothing clinical, reads no care plan.
    assert httpx.get(f"{server.fhir}/ImagingStudy", headers=bearer).status_code == 200
    assert httpx.get(f"{server.fhir}/MedicationRequest", headers=bearer).status_code == 403
    written = httpx.post(
        f"{server.fhir}/Observation",
        headers={**bearer, "Content-Type": "application/fhir+json"},
        json={"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
    )
    assert written.status_code == 403, written.text
    admin = staff_token(server, "root.admin", activate_staff(server, "root.admin", "admin"))
    claims = claims_of(server, admin["access_token"])
    assert claims["roles"] == ["admin"] and claims["scope"] == ""
    bearer = {"Authorization": f"Bearer {admin['access_token']}"}
    assert httpx.get(f"{server.fhir}/Observation", headers=bearer).status_code == 403


def test_accounts_of_the_wrong_kind_are_refused(server: Server) -> None:
    secret = activate_staff(server, "dr.house", "clinician")
    patient = ids.patient_id("HOSP", "ALICE")
    invite = accounts.invite_patient(server.engine, patient)
    with httpx.Client(base_url=server.base) as browser:
        fields = form_fields(browser.get(f"/auth/activate?{urlencode({'token': invite})}").text)
        fields.update(username="alice", password=PASSWORD, password2=PASSWORD, totp="")
        assert browser.post("/auth/activate", data=fields).status_code == 200
    # A patient at the console: the right password, still no code.
    answer, _, _ = sign_in_page(server, console_client(server), "alice", PASSWORD, "")
    assert answer.status_code == 400 and "cannot sign in to Staff console" in answer.text
    # Staff at the patient portal: the same.
    portal = OAuth2Client(
        client_id=PORTAL,
        token_endpoint_auth_method="none",
        redirect_uri=PORTAL_REDIRECT,
        scope=clients.SMART_APP_SCOPES,
        code_challenge_method="S256",
    )
    answer, _, _ = sign_in_page(server, portal, "dr.house", PASSWORD, next_code(secret))
    assert answer.status_code == 400 and "cannot sign in to Patient portal" in answer.text


def test_bad_inputs(server: Server) -> None:
    secret = activate_staff(server, "dr.who", "clinician")
    client = console_client(server)
    # Wrong password, and a right password without the TOTP code: the same refusal.
    for password, code in ((PASSWORD + "x", next_code(secret)), (PASSWORD, "")):
        answer, _, _ = sign_in_page(server, client, "dr.who", password, code)
        assert answer.status_code == 400 and "That did not work" in answer.text
    # A code redeemed with another PKCE verifier is refused.
    answer, _, _ = sign_in_page(server, client, "dr.who", PASSWORD, next_code(secret))
    assert answer.status_code == 302
    refused = httpx.post(
        f"{server.base}/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": dict(
                p.split("=", 1) for p in answer.headers["location"].split("?")[1].split("&")
            )["code"],
            "redirect_uri": CONSOLE_REDIRECT,
            "code_verifier": secrets.token_urlsafe(48),
        },
        auth=(CONSOLE, server.console_secret),
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    # Creation: a taken username, an unknown role.
    with pytest.raises(accounts.UsernameRefused):
        accounts.create_staff(server.engine, "dr.who", "operator")
    with pytest.raises(ValueError, match="role must be one of"):
        accounts.create_staff(server.engine, "someone", "surgeon")
    # A staff account not activated yet cannot sign in.
    accounts.create_staff(server.engine, "pending", "operator")
    answer, _, _ = sign_in_page(server, client, "pending", PASSWORD, "")
    assert answer.status_code == 400


def test_the_cli_creates_staff_accounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scanwatch staff create``: the printed link opens the staff activation page for that
    username; a taken username or an unknown role exits 2 and writes nothing."""
    database_url = f"sqlite:///{tmp_path / 'fhir.db'}"
    monkeypatch.setattr(cli, "configure_logging", lambda *_args: None)
    monkeypatch.setenv("SCANWATCH_FHIR_DATABASE_URL", database_url)
    monkeypatch.delenv("SCANWATCH_AUTH_ISSUER", raising=False)
    argv = ["--var", str(tmp_path), "staff", "create"]
    assert cli.main([*argv, "dr.cli", "--role", "clinician"]) == 0
    out = capsys.readouterr().out
    links = re.findall(r"http://127\.0\.0\.1:8080/auth/activate\?token=\S+", out)
    assert len(links) == 1 and "dr.cli (clinician)" in out
    assert cli.main([*argv, "dr.cli", "--role", "operator"]) == 2
    assert "taken" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "someone", "--role", "surgeon"])
    redirect = "http://127.0.0.1:8100/callback"
    argv = ["--var", str(tmp_path), "clients", "register-staff-app", "cli-console"]
    assert cli.main([*argv, "--redirect-uri", redirect, "--description", "CLI console"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered["redirect_uris"] == [redirect] and len(registered["client_secret"]) > 30
    assert cli.main([*argv, "--redirect-uri", "http://evil.example/cb"]) == 2
    settings = Settings(
        database_url=database_url, auth_mode="required", signing_keys_file=tmp_path / "k.json"
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        link = urlsplit(links[0])
        page = client.get(f"{link.path}?{link.query}")
        assert page.status_code == 200 and "staff account <strong>dr.cli</strong>" in page.text
        assert "Authenticator app (required)" in page.text
        engine = client.app.state.store.engine  # type: ignore[attr-defined]
        registered_app = clients.get_client(engine, "cli-console")
        assert registered_app is not None and not registered_app.public
        assert registered_app.scopes == clients.STAFF_APP_SCOPES
