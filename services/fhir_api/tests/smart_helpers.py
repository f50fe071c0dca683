"""What the SMART sign-in tests share: a patient with results, an invited and activated
account, a registered app, and a browser's walk through the sign-in page (form fields read
from the HTML the server answered, as a browser would submit them)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from sqlalchemy.engine import Engine

from devtools.browser import form_fields
from scanwatch import ids
from services.auth import accounts, clients

#: The portal's callback (never contacted: the tests read the redirect's Location).
REDIRECT_URI = "http://127.0.0.1:8081/callback"
APP = "test-portal"
SCOPE = (
    "launch/patient openid fhirUser offline_access patient/*.read "
    "patient/CommunicationRequest.write"
)
PASSWORD = "correct horse battery staple"


def pkce() -> tuple[str, str]:
    """(verifier, S256 challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def register_app(engine: Engine) -> None:
    clients.register_app(engine, APP, [REDIRECT_URI], description="Test portal")


def activate_patient(engine: Engine, http: httpx.Client, patient: str, username: str) -> None:
    """Invite the patient and activate the account through the activation page."""
    token = accounts.invite_patient(engine, patient)
    page = http.get(f"/auth/activate?{urlencode({'token': token})}")
    assert page.status_code == 200, page.text
    fields = form_fields(page.text)
    fields.update(username=username, password=PASSWORD, password2=PASSWORD, totp="")
    done = http.post("/auth/activate", data=fields)
    assert done.status_code == 200 and "Your account is ready" in done.text, done.text


def patient_of(patient_id: str) -> str:
    return ids.patient_id("HOSP", patient_id)


@dataclass
class Authorization:
    verifier: str
    state: str
    params: dict[str, str]


def authorization(fhir_base: str, **overrides: str | None) -> Authorization:
    """An authorization request's parameters (``None`` in ``overrides`` leaves one out)."""
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(16)
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": APP,
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPE,
        "state": state,
        "aud": fhir_base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return Authorization(verifier, state, {k: v for k, v in params.items() if v is not None})


def sign_in(
    http: httpx.Client,
    url: str,
    username: str,
    password: str = PASSWORD,
    totp: str = "",
) -> httpx.Response:
    """Open the sign-in page at ``url`` and submit it with these credentials; the answer to
    the form (a redirect to the app, or the page again with an error)."""
    page = http.get(url)
    assert page.status_code == 200, page.text
    fields = form_fields(page.text)
    fields.update(username=username, password=password, totp=totp, action="sign-in")
    return http.post("/auth/authorize", data=fields)


def redirect_params(response: httpx.Response) -> dict[str, str]:
    """The query parameters of a redirect to the app (asserting it goes there)."""
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
