"""Server-side web sessions for the apps that sign people in through this authorization
server (the patient portal, the staff console): the browser holds only a random session id
(an HttpOnly cookie); the tokens and the pending sign-in (state, PKCE verifier) stay here.

In memory, in one process: a restart signs everyone out, and nothing holding a token is ever
written to disk. A session ends after ``idle_s`` without use or ``max_s`` in all; an ended
session's id is remembered for a while so the person can be told why they must sign in again.
Each app subclasses :class:`WebSession` with what it keeps about its signed-in person.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from starlette.responses import Response

#: How long an ended session's id is remembered (to say "your session has ended").
ENDED_MEMORY_S = 24 * 3600.0


@dataclass
class WebSession:
    """One browser's session with an app."""

    id: str
    csrf: str
    created: float
    seen: float
    # The sign-in under way (authorization request sent, callback not yet back).
    login_state: str | None = None
    code_verifier: str | None = None
    login_started: float | None = None
    # The tokens once signed in.
    access_token: str | None = None
    refresh_token: str | None = None
    expires_at: float = 0.0
    #: Held while the tokens are refreshed, so that two requests do not both spend the
    #: (single-use) refresh token.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def signed_in(self) -> bool:
        return self.access_token is not None

    def check_csrf(self, token: str | None) -> bool:
        # Bytes: compare_digest refuses str with non-ASCII characters (a forged form's).
        return token is not None and hmac.compare_digest(self.csrf.encode(), token.encode())

    def check_login_state(self, state: str) -> bool:
        """Whether ``state`` is the one the pending sign-in sent (constant time)."""
        return self.login_state is not None and hmac.compare_digest(
            self.login_state.encode(), state.encode()
        )


class NeedSignIn(Exception):
    """No signed-in session: the person signs in (``expired``: tell them their session
    ended)."""

    def __init__(self, expired: bool = False) -> None:
        super().__init__("sign-in needed")
        self.expired = expired


class CsrfRejected(Exception):
    """A form or script request without this session's CSRF token."""


def check_csrf(session: WebSession, token: str | None) -> None:
    """:class:`CsrfRejected` unless ``token`` is the session's CSRF token."""
    if not session.check_csrf(token):
        raise CsrfRejected()


S = TypeVar("S", bound=WebSession)


class CookieSettings(Protocol):
    """What an app's settings say of its session cookie."""

    @property
    def session_cookie(self) -> str: ...  # the cookie's name

    @property
    def session_max_s(self) -> float: ...  # the longest a session lasts

    @property
    def secure_cookies(self) -> bool: ...  # Secure (off only on loopback)


def set_session_cookie(response: Response, settings: CookieSettings, session: WebSession) -> None:
    """The session id in its cookie: HttpOnly, SameSite=Lax (the authorization server's
    redirect back is a top-level GET, which Lax lets through), Secure outside loopback."""
    response.set_cookie(
        settings.session_cookie,
        session.id,
        max_age=int(settings.session_max_s),
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
    )


def clear_session_cookie(response: Response, settings: CookieSettings) -> None:
    response.delete_cookie(
        settings.session_cookie,
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
    )


class SessionStore(Generic[S]):
    """The sessions of this process, by id; ``factory`` makes a new one (the app's class)."""

    def __init__(
        self,
        factory: Callable[..., S],
        idle_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.idle_s = idle_s
        self.max_s = max_s
        self.clock = clock
        self._sessions: dict[str, S] = {}
        self._ended: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def new(self) -> S:
        self.sweep()  # abandoned sessions (closed tabs, sign-ins never finished) go here
        now = self.clock()
        session = self.factory(
            id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), created=now, seen=now
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> tuple[S | None, bool]:
        """(the live session of this id, whether the id named a session that has ended)."""
        if not session_id:
            return None, False
        session = self._sessions.get(session_id)
        now = self.clock()
        if session is None:
            return None, session_id in self._ended
        if now - session.seen > self.idle_s or now - session.created > self.max_s:
            was_signed_in = session.signed_in
            self.end(session, remember=was_signed_in)
            return None, was_signed_in
        session.seen = now
        return session, False

    def rotate(self, session: S) -> S:
        """The same session under a new id and a new CSRF token (after sign-in: an id known
        before it must not reach the signed-in session)."""
        self._sessions.pop(session.id, None)
        session.id = secrets.token_urlsafe(32)
        session.csrf = secrets.token_urlsafe(32)
        self._sessions[session.id] = session
        return session

    def end(self, session: S, remember: bool = True) -> None:
        """Forget the session (its tokens with it)."""
        self._sessions.pop(session.id, None)
        session.access_token = session.refresh_token = None
        now = self.clock()
        if remember:
            self._ended[session.id] = now
        for old in [k for k, t in self._ended.items() if now - t > ENDED_MEMORY_S]:
            del self._ended[old]

    def sweep(self) -> int:
        """End every session past its idle or total lifetime; how many were ended."""
        now = self.clock()
        old = [
            s
            for s in self._sessions.values()
            if now - s.seen > self.idle_s or now - s.created > self.max_s
        ]
        for session in old:
            self.end(session, remember=session.signed_in)  # end() reads it before clearing
        return len(old)
