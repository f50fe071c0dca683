"""Hostile values in the authorization server's forms and the web apps' session checks:
characters outside ASCII where a CSRF token, a sign-in ``state`` or a TOTP code belongs
(``hmac.compare_digest`` raises ``TypeError`` on such ``str``; Python's ``\\d`` matches the
digits of other scripts). Each is refused like any wrong value (403, 400), never a 500.
Found by schemathesis on the console's pages (a non-ASCII ``csrf_token`` was a 500)."""

from __future__ import annotations

from urllib.parse import urlencode

import pyotp
from fastapi.testclient import TestClient

from services.auth import accounts
from services.auth.web_sessions import WebSession
from services.fhir_api.tests.smart_helpers import (
    PASSWORD,
    authorization,
    form_fields,
    patient_of,
    sign_in,
)
from services.fhir_api.tests.test_smart_refusals import (
    FHIR,
    Clock,
    authorize_url,
    clock,
    engine_of,
    refused_sign_in,
    web,
)

__all__ = ["clock", "web"]  # the fixtures, shared with the SMART refusals' tests

NOT_ASCII = ("é" * 43, "\u0080", "٣" * 43, "𝟘" * 10)
#: Six digits, none of them ASCII (Arabic-Indic, Devanagari, full-width).
FOREIGN_DIGITS = ("٣٣٣٣٣٣", "१२३४५६", "１２３４５６")


def test_web_sessions_refuse_non_ascii_tokens_and_states() -> None:
    session = WebSession(id="s", csrf="a" * 43, created=0.0, seen=0.0, login_state="b" * 43)
    for value in NOT_ASCII:
        assert not session.check_csrf(value)
        assert not session.check_login_state(value)
    assert session.check_csrf("a" * 43) and session.check_login_state("b" * 43)


def test_a_non_ascii_csrf_token_is_refused_with_403(web: TestClient) -> None:
    page = web.get(authorize_url(authorization(FHIR)))
    fields = form_fields(page.text) | {"username": "alice", "password": PASSWORD}
    fields["action"] = "sign-in"
    for value in NOT_ASCII:
        answer = web.post("/auth/authorize", data=fields | {"csrf_token": value})
        assert answer.status_code == 403, (value, answer.status_code)
        assert "location" not in answer.headers


def test_non_ascii_digits_are_not_a_totp_code(web: TestClient, clock: Clock) -> None:
    for code in FOREIGN_DIGITS:
        assert accounts.totp_step(pyotp.random_base32(), code, clock.now) is None
    engine = engine_of(web)
    token = accounts.invite_patient(engine, patient_of("CAROL"), now=clock.now)
    fields = form_fields(web.get(f"/auth/activate?{urlencode({'token': token})}").text)
    fields.update(username="carol", password=PASSWORD, password2=PASSWORD)
    for value in NOT_ASCII:
        refused = web.post("/auth/activate", data=fields | {"csrf_token": value})
        assert refused.status_code == 403, (value, refused.status_code)
    for code in FOREIGN_DIGITS:
        answer = web.post("/auth/activate", data=fields | {"totp": code})
        assert answer.status_code == 400, (code, answer.status_code)  # a wrong setup code
    totp = pyotp.TOTP(fields["totp_secret"])
    assert web.post("/auth/activate", data=fields | {"totp": totp.at(clock.now)}).status_code == 200
    url = authorize_url(authorization(FHIR))
    for code in FOREIGN_DIGITS:
        refused_sign_in(sign_in(web, url, "carol", totp=code))
