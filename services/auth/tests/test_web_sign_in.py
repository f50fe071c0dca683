"""The sign-in callback's steps every web app shares (services.auth.web_client.complete_sign_in)
and the answers of services.auth.web_errors, on a bare FastAPI app: each app's own tests drive
them through its pages."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.testclient import TestClient

from devtools.testing import logged
from services.auth.web_client import (
    AuthServerUnavailable,
    CallbackRefused,
    ClientSettings,
    SessionExpired,
    SignInError,
    WebClient,
    complete_sign_in,
    refreshed_tokens,
)
from services.auth.web_errors import install_error_pages
from services.auth.web_sessions import (
    CsrfRejected,
    NeedSignIn,
    SessionStore,
    WebSession,
    check_csrf,
)


@dataclass(frozen=True)
class Issued:
    access_token: str
    refresh_token: str | None
    expires_at: float


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pending(store: SessionStore[WebSession], clock: Clock) -> WebSession:
    session = store.new()
    session.login_state, session.code_verifier, session.login_started = "st", "ver", clock.now
    return session


def test_a_callback_with_the_pending_state_rotates_the_session_and_keeps_the_tokens() -> None:
    clock = Clock()
    store: SessionStore[WebSession] = SessionStore(WebSession, 600, 3600, clock)
    session = pending(store, clock)
    old_id, old_csrf = session.id, session.csrf
    exchanged: list[tuple[str, str]] = []

    async def exchange(code: str, verifier: str) -> Issued:
        exchanged.append((code, verifier))
        return Issued("access", "refresh", 1300.0)

    signed, tokens = asyncio.run(
        complete_sign_in(store, session, exchange, code="c", state="st", error=None, timeout_s=60)
    )
    assert exchanged == [("c", "ver")]
    assert tokens.access_token == "access"
    assert signed.id != old_id and signed.csrf != old_csrf
    assert store.get(old_id) == (None, False) and store.get(signed.id)[0] is signed
    assert (signed.access_token, signed.refresh_token, signed.expires_at) == (
        "access",
        "refresh",
        1300.0,
    )
    assert signed.login_state is None and signed.code_verifier is None


@pytest.mark.parametrize(
    ("state", "late", "error", "outcome", "said"),
    [
        ("other", False, None, "bad-state", "This sign-in link is not valid"),
        ("st", True, None, "bad-state", "This sign-in link is not valid"),
        ("st", False, "access_denied", "refused", "You cancelled the sign-in."),
        ("st", False, "server_error", "refused", "The sign-in failed."),
    ],
)
def test_a_callback_that_is_not_the_pending_sign_in_exchanges_nothing(
    state: str, late: bool, error: str | None, outcome: str, said: str
) -> None:
    clock = Clock()
    store: SessionStore[WebSession] = SessionStore(WebSession, 600, 3600, clock)
    session = pending(store, clock)
    clock.now += 61 if late else 1

    async def exchange(code: str, verifier: str) -> Issued:
        raise AssertionError("exchanged")

    with pytest.raises(CallbackRefused) as refused:
        asyncio.run(
            complete_sign_in(
                store, session, exchange, code="c", state=state, error=error, timeout_s=60
            )
        )
    assert refused.value.outcome == outcome
    assert refused.value.message.startswith(said)
    assert session.access_token is None
    if outcome == "refused":  # the state matched: it is spent, a replay is refused
        assert session.login_state is None and session.code_verifier is None


def test_a_code_the_app_does_not_accept_is_a_failed_sign_in_with_its_reason() -> None:
    clock = Clock()
    store: SessionStore[WebSession] = SessionStore(WebSession, 600, 3600, clock)
    session = pending(store, clock)

    async def exchange(code: str, verifier: str) -> Issued:
        raise SignInError("This account cannot use it.", "not a staff member's token")

    with pytest.raises(CallbackRefused) as refused:
        asyncio.run(
            complete_sign_in(
                store, session, exchange, code="c", state="st", error=None, timeout_s=60
            )
        )
    assert refused.value.outcome == "failed"
    assert refused.value.message == "This account cannot use it. Please try again."
    assert refused.value.detail == "not a staff member's token"
    assert store.get(session.id)[0] is session  # not rotated, not signed in
    assert not session.signed_in


def refreshing() -> tuple[Clock, SessionStore[WebSession], WebClient, WebSession]:
    """A signed-in web session and its client, on a clock the test moves."""
    clock = Clock()
    store: SessionStore[WebSession] = SessionStore(WebSession, 600, 3600, clock)
    settings = ClientSettings("app", "secret", "http://app/callback", "openid", "http://c", "a")
    return clock, store, WebClient(settings, clock=clock), store.new()


def test_tokens_are_renewed_only_when_due_and_a_refusal_ends_the_session() -> None:
    clock, store, client, session = refreshing()
    session.access_token, session.refresh_token, session.expires_at = "a1", "r1", 1300.0
    spent: list[str] = []

    async def refresh(token: str) -> Issued:
        spent.append(token)
        if token == "refused":
            raise SessionExpired("refused")
        return Issued("a2", None, clock.now + 300)

    def renew() -> Issued | None:
        return asyncio.run(refreshed_tokens(client, store, session, refresh))

    assert renew() is None and spent == []  # 300 s left: not due
    clock.now = 1280.0  # inside the margin
    assert renew() == Issued("a2", None, 1580.0)
    assert (session.access_token, session.refresh_token, session.expires_at) == (
        "a2",
        "r1",  # no new refresh token: the old one stays
        1580.0,
    )
    clock.now = 1580.0
    session.refresh_token = "refused"
    with pytest.raises(NeedSignIn) as ended:
        renew()
    assert ended.value.expired and spent == ["r1", "refused"]
    assert session.access_token is None and store.get(session.id) == (None, True)


def test_a_session_ended_by_a_refused_refresh_says_why_in_the_log() -> None:
    clock, store, client, session = refreshing()
    session.access_token, session.refresh_token, session.expires_at = "a1", "secret-r1", 10.0

    async def refuse(token: str) -> Issued:
        raise SessionExpired("invalid_grant: the refresh token is not current")

    with logged("services.auth.web_client") as records, pytest.raises(NeedSignIn):
        asyncio.run(refreshed_tokens(client, store, session, refuse))
    [record] = [r for r in records if r.levelno == logging.WARNING]
    assert record.getMessage() == "session ended: its tokens could not be refreshed"
    assert record.__dict__["reason"] == "invalid_grant: the refresh token is not current"
    assert "secret-r1" not in repr(record.__dict__)  # never the token


def test_error_pages_redirect_a_page_load_answer_a_script_and_draw_the_apps_page() -> None:
    app = FastAPI()
    drawn: list[tuple[int, str]] = []

    def error_page(request: Request, status: int, title: str, text: str) -> Response:
        drawn.append((status, title))
        return PlainTextResponse(text, status_code=status)

    install_error_pages(app, error_page, "testing app")
    session = WebSession(id="i", csrf="right", created=0.0, seen=0.0)

    @app.get("/page")
    @app.get("/api/data")
    async def need() -> Response:
        raise NeedSignIn(expired=True)

    @app.post("/form")
    async def post_form() -> Response:
        check_csrf(session, "wrong")
        return PlainTextResponse("sent")

    @app.get("/login")
    async def start_login() -> Response:
        raise AuthServerUnavailable("down")

    client = TestClient(app)
    page = client.get("/page", follow_redirects=False)
    assert (page.status_code, page.headers["location"]) == (303, "/signin?reason=expired")
    script = client.get("/api/data")
    assert (script.status_code, script.json()) == (
        401,
        {"status": 401, "signin": "/signin?reason=expired"},
    )
    stream = client.get("/page", headers={"Accept": "text/event-stream"})
    assert stream.status_code == 401
    form = client.post("/form")
    assert form.status_code == 403 and "not from this testing app" in form.text
    login = client.get("/login")
    assert login.status_code == 503 and "sign-in service did not answer" in login.text
    assert drawn == [
        (403, "This form has expired"),
        (503, "Signing in is not possible right now"),
    ]
    with pytest.raises(CsrfRejected):
        check_csrf(session, None)
