"""SMART sign-in and patient accounts: every bad input refused, each in its own test, with the
answer OAuth 2.0 prescribes (an error sent back to a verified redirect URI with the ``state``,
a page when the redirect URI cannot be trusted, ``invalid_grant`` at the token endpoint); the
pages' cookies and security headers; no secret in the logs. SQLite; the time of codes, invites
and lockouts is the server's injected clock."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pyotp
import pytest
from fastapi.testclient import TestClient

from services.auth import accounts, clients
from services.auth.pages import CSRF_COOKIE
from services.auth.routes import SIGN_IN_REFUSED
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.smart_helpers import (
    APP,
    PASSWORD,
    REDIRECT_URI,
    Authorization,
    activate_patient,
    authorization,
    form_fields,
    patient_of,
    redirect_params,
    register_app,
    sign_in,
)

BASE = "http://127.0.0.1:8080"
FHIR = f"{BASE}/fhir"
START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
REFUSED = SIGN_IN_REFUSED.format(failures=5, minutes=15)


class Clock:
    """The server's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def web(tmp_path: Path, signing_keys: Path, clock: Clock) -> Iterator[TestClient]:
    """The API on SQLite as a browser and an app reach it on loopback, with the test portal
    registered and ALICE's account (username alice) activated."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
        auth_mode="required",
        signing_keys_file=signing_keys,
    )
    app = create_app(settings)
    with TestClient(app, base_url=BASE, follow_redirects=False) as client:
        app.state.smart_server.clock = clock
        register_app(app.state.store.engine)
        activate_patient(app.state.store.engine, client, patient_of("ALICE"), "alice")
        yield client


def engine_of(web: TestClient):  # noqa: ANN201 - the app's SQL engine
    return web.app.state.store.engine  # type: ignore[attr-defined]


def authorize_url(request: Authorization) -> str:
    return f"/auth/authorize?{urlencode(request.params)}"


def code_for(web: TestClient, request: Authorization, username: str = "alice") -> str:
    params = redirect_params(sign_in(web, authorize_url(request), username))
    assert params["state"] == request.state
    return params["code"]


def redeem(web: TestClient, code: str, verifier: str, **extra: str):  # noqa: ANN201
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": APP,
        "code_verifier": verifier,
        **extra,
    }
    return web.post("/auth/token", data=data)


def refresh(web: TestClient, refresh_token: str):  # noqa: ANN201
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": APP}
    return web.post("/auth/token", data=data)


def tokens(web: TestClient) -> dict:
    request = authorization(FHIR)
    answer = redeem(web, code_for(web, request), request.verifier)
    assert answer.status_code == 200, answer.text
    return answer.json()


def refused_sign_in(answer) -> None:  # noqa: ANN001
    assert answer.status_code == 400 and "location" not in answer.headers
    assert REFUSED in answer.text.replace("&#39;", "'")


# --- sign-in -----------------------------------------------------------------------------------


def test_a_wrong_password_is_refused_like_an_unknown_username(web: TestClient) -> None:
    url = authorize_url(authorization(FHIR))
    wrong = sign_in(web, url, "alice", "not the password at all")
    unknown = sign_in(web, url, "nobody-here", "not the password at all")
    refused_sign_in(wrong)
    refused_sign_in(unknown)
    message = re.compile(r'<p class="error"[^>]*>(.*?)</p>', re.S)
    assert message.findall(wrong.text) == message.findall(unknown.text)


def test_repeated_failures_lock_the_account_until_the_lockout_ends(
    web: TestClient, clock: Clock
) -> None:
    url = authorize_url(authorization(FHIR))
    for _ in range(5):
        refused_sign_in(sign_in(web, url, "alice", "not the password at all"))
    refused_sign_in(sign_in(web, url, "alice"))  # locked: even the right password
    clock.advance(15 * 60 - 1)
    refused_sign_in(sign_in(web, url, "alice"))
    clock.advance(2)
    assert sign_in(web, url, "alice").status_code == 302


def test_fewer_failures_than_the_limit_do_not_lock(web: TestClient) -> None:
    url = authorize_url(authorization(FHIR))
    for _ in range(4):
        refused_sign_in(sign_in(web, url, "alice", "not the password at all"))
    assert sign_in(web, url, "alice").status_code == 302  # and the count starts again
    for _ in range(4):
        refused_sign_in(sign_in(web, url, "alice", "not the password at all"))
    assert sign_in(web, url, "alice").status_code == 302


def test_the_sign_in_form_without_its_csrf_token_is_refused(web: TestClient) -> None:
    page = web.get(authorize_url(authorization(FHIR)))
    fields = form_fields(page.text) | {"username": "alice", "password": PASSWORD}
    fields["action"] = "sign-in"
    missing = {k: v for k, v in fields.items() if k != "csrf_token"}
    answer = web.post("/auth/authorize", data=missing)
    assert answer.status_code == 403 and "location" not in answer.headers
    wrong = fields | {"csrf_token": "x" * 43}
    assert web.post("/auth/authorize", data=wrong).status_code == 403
    web.cookies.clear()  # a forged post from elsewhere carries no cookie (SameSite=Lax)
    assert web.post("/auth/authorize", data=fields).status_code == 403


def test_a_wrong_totp_code_is_refused_when_totp_is_on(web: TestClient, clock: Clock) -> None:
    engine = engine_of(web)
    token = accounts.invite_patient(engine, patient_of("CAROL"), now=clock.now)
    page = web.get(f"/auth/activate?{urlencode({'token': token})}")
    fields = form_fields(page.text)
    totp = pyotp.TOTP(fields["totp_secret"])
    # The server's clock is fixed: codes of its time (and the step either side) are right.
    right = {totp.at(clock.now + timedelta(seconds=s)) for s in (-30, 0, 30)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in right)
    fields.update(username="carol", password=PASSWORD, password2=PASSWORD, totp=wrong)
    assert web.post("/auth/activate", data=fields).status_code == 400  # a wrong setup code
    fields["totp"] = totp.at(clock.now)
    assert web.post("/auth/activate", data=fields).status_code == 200
    url = authorize_url(authorization(FHIR))
    refused_sign_in(sign_in(web, url, "carol"))  # no code
    refused_sign_in(sign_in(web, url, "carol", totp=wrong))
    # The setup used this step's code; the next step's works, once.
    code = totp.at(clock.now + timedelta(seconds=30))
    assert sign_in(web, url, "carol", totp=code).status_code == 302
    refused_sign_in(sign_in(web, url, "carol", totp=code))  # the same code again


def test_cancel_sends_access_denied_with_the_state(web: TestClient) -> None:
    request = authorization(FHIR, state="a b/+=&é")
    page = web.get(authorize_url(request))
    fields = form_fields(page.text) | {"action": "cancel"}
    params = redirect_params(web.post("/auth/authorize", data=fields))
    assert params == {"error": "access_denied", "state": "a b/+=&é"} | {
        k: v for k, v in params.items() if k == "error_description"
    }


# --- the authorization request -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"code_challenge_method": "plain"}, "plain"),
        ({"code_challenge": None, "code_challenge_method": None}, "missing challenge"),
        ({"code_challenge_method": None}, "no method (would default to plain)"),
        ({"aud": "http://elsewhere.example/fhir"}, "another FHIR server"),
        ({"aud": None}, "no aud"),
    ],
)
def test_an_authorization_request_without_s256_pkce_or_this_aud_is_sent_back_refused(
    web: TestClient, overrides: dict[str, str | None], why: str
) -> None:
    request = authorization(FHIR, **overrides)
    params = redirect_params(web.get(authorize_url(request)))
    assert params["error"] == "invalid_request", why
    assert params["state"] == request.state and "code" not in params


def test_only_scopes_the_app_is_registered_for_are_granted(web: TestClient) -> None:
    request = authorization(FHIR, scope="system/*.read")
    params = redirect_params(web.get(authorize_url(request)))
    assert params["error"] == "invalid_scope" and params["state"] == request.state
    request = authorization(FHIR, scope="launch/patient patient/Observation.read system/*.read")
    answer = redeem(web, code_for(web, request), request.verifier).json()
    assert answer["scope"] == "launch/patient patient/Observation.read"
    assert "refresh_token" not in answer  # no offline_access asked


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "http://127.0.0.1:8081/callback/",
        "http://127.0.0.1:8081/callback?x=1",
        "http://127.0.0.1:9999/callback",
        "https://attacker.example/callback",
    ],
)
def test_a_redirect_uri_not_registered_exactly_gets_a_page_not_a_redirect(
    web: TestClient, redirect_uri: str
) -> None:
    answer = web.get(authorize_url(authorization(FHIR, redirect_uri=redirect_uri)))
    assert answer.status_code == 400 and "location" not in answer.headers
    assert "This sign-in link does not work" in answer.text


def test_an_unknown_client_gets_a_page_and_no_token(web: TestClient) -> None:
    answer = web.get(authorize_url(authorization(FHIR, client_id="no-such-app")))
    assert answer.status_code == 400 and "location" not in answer.headers
    request = authorization(FHIR)
    code = code_for(web, request)
    token = redeem(web, code, request.verifier, client_id="no-such-app")
    assert token.status_code in (400, 401) and token.json()["error"] == "invalid_client"


# --- the token endpoint --------------------------------------------------------------------------


def test_a_wrong_pkce_verifier_gets_no_token(web: TestClient) -> None:
    request = authorization(FHIR)
    code = code_for(web, request)
    answer = redeem(web, code, authorization(FHIR).verifier)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    assert "access_token" not in answer.json()


def test_a_code_works_once_and_its_replay_revokes_its_tokens(web: TestClient) -> None:
    request = authorization(FHIR)
    code = code_for(web, request)
    first = redeem(web, code, request.verifier)
    assert first.status_code == 200, first.text
    second = redeem(web, code, request.verifier)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    after = refresh(web, first.json()["refresh_token"])
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant"


def test_an_expired_code_gets_no_token(web: TestClient, clock: Clock) -> None:
    request = authorization(FHIR)
    code = code_for(web, request)
    clock.advance(61)
    answer = redeem(web, code, request.verifier)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_a_code_for_another_redirect_uri_gets_no_token(web: TestClient) -> None:
    request = authorization(FHIR)
    answer = redeem(
        web, code_for(web, request), request.verifier, redirect_uri=REDIRECT_URI + "/other"
    )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_a_reused_refresh_token_revokes_its_family(web: TestClient) -> None:
    first = tokens(web)["refresh_token"]
    second = refresh(web, first)
    assert second.status_code == 200, second.text
    replay = refresh(web, first)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    # The thief's or the holder's newer token is gone too: both must sign in again.
    newer = refresh(web, second.json()["refresh_token"])
    assert newer.status_code == 400 and newer.json()["error"] == "invalid_grant"


def test_an_expired_refresh_token_is_refused(web: TestClient, clock: Clock) -> None:
    first = tokens(web)["refresh_token"]
    clock.advance(14 * 86400 + 1)
    answer = refresh(web, first)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_another_client_cannot_use_or_revoke_a_refresh_token(web: TestClient) -> None:
    clients.register_app(engine_of(web), "other-app", ["http://127.0.0.1:8082/cb"])
    token = tokens(web)["refresh_token"]
    revoke = web.post("/auth/revoke", data={"token": token, "client_id": "other-app"})
    assert revoke.status_code == 400
    assert refresh(web, token).status_code == 200  # still good for its own client


def test_a_smart_app_cannot_use_client_credentials(web: TestClient) -> None:
    secret = clients.register_app(
        engine_of(web), "confidential-app", [REDIRECT_URI], confidential=True
    )
    answer = web.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "confidential-app",
            "client_secret": secret,
        },
    )
    assert answer.status_code == 400 and answer.json()["error"] == "unauthorized_client"


def test_a_confidential_app_must_authenticate(web: TestClient) -> None:
    secret = clients.register_app(
        engine_of(web), "confidential-app", [REDIRECT_URI], confidential=True
    )
    assert secret
    request = authorization(FHIR, client_id="confidential-app")
    code = code_for(web, request)
    bare = redeem(web, code, request.verifier, client_id="confidential-app")
    assert bare.status_code in (400, 401) and bare.json()["error"] == "invalid_client"
    request = authorization(FHIR, client_id="confidential-app")
    code = code_for(web, request)
    good = redeem(web, code, request.verifier, client_id="confidential-app", client_secret=secret)
    assert good.status_code == 200, good.text


# --- accounts ------------------------------------------------------------------------------------


def test_an_expired_invite_does_not_open(web: TestClient, clock: Clock) -> None:
    token = accounts.invite_patient(engine_of(web), patient_of("DAVE"), now=clock.now)
    link = f"/auth/activate?{urlencode({'token': token})}"
    assert web.get(link).status_code == 200
    fields = form_fields(web.get(link).text)
    clock.advance(72 * 3600 + 1)
    assert web.get(link).status_code == 410
    fields.update(username="dave", password=PASSWORD, password2=PASSWORD)
    assert web.post("/auth/activate", data=fields).status_code == 410


def test_an_invite_works_once(web: TestClient, clock: Clock) -> None:
    token = accounts.invite_patient(engine_of(web), patient_of("DAVE"), now=clock.now)
    link = f"/auth/activate?{urlencode({'token': token})}"
    fields = form_fields(web.get(link).text)
    fields.update(username="dave", password=PASSWORD, password2=PASSWORD)
    assert web.post("/auth/activate", data=fields).status_code == 200
    assert web.get(link).status_code == 410
    fields.update(username="dave2")
    assert web.post("/auth/activate", data=fields).status_code == 410
    assert web.get("/auth/activate?token=made-up").status_code == 410


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("short pass", "at least 12"),
        ("x" * 129, "at most 128"),
        ("qwerty123456", "too common"),
        ("aaaaaaaaaaaaaaa", "too common"),
        ("dave-is-my-name-123", "username"),
    ],
)
def test_a_weak_password_is_refused_and_the_invite_stays_usable(
    web: TestClient, clock: Clock, password: str, why: str
) -> None:
    token = accounts.invite_patient(engine_of(web), patient_of("DAVE"), now=clock.now)
    fields = form_fields(web.get(f"/auth/activate?{urlencode({'token': token})}").text)
    fields.update(username="dave", password=password, password2=password)
    answer = web.post("/auth/activate", data=fields)
    assert answer.status_code == 400 and why in answer.text, why
    fields.update(password=PASSWORD, password2=PASSWORD)
    assert web.post("/auth/activate", data=fields).status_code == 200


def test_activation_refuses_a_taken_username_mismatched_passwords_and_no_csrf(
    web: TestClient, clock: Clock
) -> None:
    token = accounts.invite_patient(engine_of(web), patient_of("DAVE"), now=clock.now)
    fields = form_fields(web.get(f"/auth/activate?{urlencode({'token': token})}").text)
    fields.update(username="alice", password=PASSWORD, password2=PASSWORD)
    taken = web.post("/auth/activate", data=fields)
    assert taken.status_code == 400 and "taken" in taken.text
    fields.update(username="dave", password2=PASSWORD + "!")
    assert "not the same" in web.post("/auth/activate", data=fields).text
    fields.update(password2=PASSWORD)
    no_csrf = {k: v for k, v in fields.items() if k != "csrf_token"}
    assert web.post("/auth/activate", data=no_csrf).status_code == 403
    assert web.post("/auth/activate", data=fields).status_code == 200


def test_a_new_invite_resets_the_password_and_ends_the_sessions(
    web: TestClient, clock: Clock
) -> None:
    refresh_token = tokens(web)["refresh_token"]
    token = accounts.invite_patient(engine_of(web), patient_of("ALICE"), now=clock.now)
    fields = form_fields(web.get(f"/auth/activate?{urlencode({'token': token})}").text)
    new_password = "a different long passphrase"
    fields.update(username="alice", password=new_password, password2=new_password)
    assert web.post("/auth/activate", data=fields).status_code == 200
    assert refresh(web, refresh_token).json()["error"] == "invalid_grant"
    url = authorize_url(authorization(FHIR))
    refused_sign_in(sign_in(web, url, "alice"))
    assert sign_in(web, url, "alice", new_password).status_code == 302


# --- what the pages send -------------------------------------------------------------------------


def test_pages_carry_a_strict_csp_and_cookies_of_their_own(web: TestClient) -> None:
    page = web.get(authorize_url(authorization(FHIR)))
    csp = page.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "script-src" not in csp and "default-src 'none'" in csp
    assert "form-action 'self' http://127.0.0.1:8081" in csp  # the code's redirect
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{CSRF_COOKIE}=") and "Path=/auth" in cookie
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    assert "<script" not in page.text and " style=" not in page.text
    for label in ("username", "password", "totp"):
        assert f'<label for="{label}">' in page.text and f'id="{label}"' in page.text
    answer = sign_in(web, authorize_url(authorization(FHIR)), "alice")
    assert "unsafe-inline" not in answer.headers["content-security-policy"]


def test_cookies_are_secure_off_loopback(tmp_path: Path, signing_keys: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
        auth_mode="required",
        signing_keys_file=signing_keys,
    )
    app = create_app(settings)
    with TestClient(app, base_url="https://hospital.example") as client:
        token = accounts.invite_patient(app.state.store.engine, patient_of("ERIN"))
        page = client.get(f"/auth/activate?{urlencode({'token': token})}")
        assert page.status_code == 200
        assert "Secure" in page.headers["set-cookie"]


def test_no_password_code_or_token_reaches_the_logs(
    web: TestClient, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    invite = accounts.invite_patient(engine_of(web), patient_of("FRANK"), now=clock.now)
    fields = form_fields(web.get(f"/auth/activate?{urlencode({'token': invite})}").text)
    fields.update(username="frank", password=PASSWORD, password2=PASSWORD)
    assert web.post("/auth/activate", data=fields).status_code == 200
    refused_sign_in(sign_in(web, authorize_url(authorization(FHIR)), "frank", "wrong password!"))
    request = authorization(FHIR)
    code = code_for(web, request, "frank")
    issued = redeem(web, code, request.verifier).json()
    refreshed = refresh(web, issued["refresh_token"]).json()
    web.post("/auth/revoke", data={"token": refreshed["refresh_token"], "client_id": APP})
    secrets_seen = [
        PASSWORD,
        "wrong password!",
        invite,
        code,
        request.verifier,
        issued["access_token"],
        issued["refresh_token"],
        refreshed["refresh_token"],
        issued["id_token"].split(".")[1],
    ]
    # The test's own HTTP client (httpx, through TestClient) logs the URLs it asks for;
    # services quiet it (scanwatch.logs) and the API's server writes no access log.
    server_records = [r for r in caplog.records if not r.name.startswith("httpx")]
    assert {r.name for r in server_records} >= {"services.auth.accounts", "services.auth.store"}
    for record in server_records:
        text = f"{record.getMessage()} {vars(record)}"
        for secret in secrets_seen:
            assert secret not in text, (record.name, record.getMessage())
