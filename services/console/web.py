"""The console's web pages for staff: sign-in at the authorization server (OpenID Connect,
authorization code with PKCE, the console a confidential client), a server-side session, and
the role every page and API declares (:func:`require_role`).

- the session is :class:`services.auth.web_sessions.WebSession` with the staff member's
  account, roles and ``fhirUser``; the browser holds only its id (HttpOnly, SameSite=Lax,
  Secure off loopback); forms carry the session's CSRF token;
- a token is kept only when it verifies against the JWKS and is a staff member's
  (``roles``, ``user/`` scopes, no patient: :attr:`services.auth.scopes.Grant.staff`): a
  patient's sign-in, or any other token, opens no page;
- :func:`require_role` is the one gate: no session → sign in (401 for an API), a role not
  given → 403, both audited (:mod:`services.console.audit`) like every action let through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine

from scanwatch.database import make_engine
from services.auth.scopes import ADMIN, CLINICIAN, OPERATOR
from services.auth.web_client import (
    CallbackRefused,
    ClientSettings,
    SessionExpired,
    SignInError,
    Tokens,
    Verifier,
    WebClient,
    complete_sign_in,
    refreshed_tokens,
    sign_out,
    start_sign_in,
)
from services.auth.web_security import event_stream
from services.auth.web_sessions import (
    NeedSignIn,
    SessionStore,
    WebSession,
    check_csrf,
    clear_session_cookie,
    set_session_cookie,
)
from services.console import audit
from services.console.config import Settings
from services.console.worklist import PAGE_SIZE, Filters, Worklist, top_up_results

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
router = APIRouter()

#: What the console asks for: identity, a refresh token, and every user/ scope of a staff
#: role (the authorization server grants only the signed-in person's role's).
SCOPES = (
    "openid fhirUser offline_access user/*.read user/Observation.write "
    "user/DiagnosticReport.write user/MedicationRequest.write user/Appointment.write "
    "user/CommunicationRequest.write user/Provenance.write"
)
#: How old the index a worklist page reads may be (seconds; see _refresh_worklist).
WORKLIST_INDEX_AGE_S = 2.0
#: Where each role lands after sign-in.
HOME = {CLINICIAN: "/worklist", OPERATOR: "/worklist", ADMIN: "/admin"}
#: What the sign-in page says, by ``?reason=``.
SIGN_IN_REASONS = {
    "expired": "Your session has ended. Please sign in again.",
    "signed-out": "You have signed out.",
}


@dataclass
class ConsoleSession(WebSession):
    """One browser's session with the console: the signed-in staff member."""

    account: str | None = None
    roles: tuple[str, ...] = ()
    fhir_user: str | None = None

    @property
    def signed_in(self) -> bool:
        return self.account is not None and self.access_token is not None

    @property
    def actor(self) -> audit.Actor:
        return audit.Actor(self.account or "", self.roles, self.fhir_user)


class StaffClient(WebClient):
    """The console's OpenID Connect client: a token is kept only when it is a staff
    member's."""

    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        secret = settings.client_secret.get_secret_value() if settings.client_secret else ""
        super().__init__(
            ClientSettings(
                client_id=settings.client_id,
                client_secret=secret,
                redirect_uri=settings.redirect_uri,
                scope=SCOPES,
                configuration_url=settings.smart_configuration_url,
                audience=settings.fhir_base_url,
                timeout_s=settings.http_timeout_s,
                jwks_ttl_s=settings.jwks_ttl_s,
            ),
            transport,
            verifier,
            clock,
        )

    async def exchange(self, code: str, code_verifier: str) -> Tokens:
        return self._staff(await self.verified(await self.fetch_tokens(code, code_verifier)))

    async def refresh(self, refresh_token: str, account: str) -> Tokens:
        tokens = self._staff(await self.verified(await self.refresh_tokens(refresh_token)))
        if tokens.grant.client_id != account:
            raise SessionExpired("the refreshed token is another account's")
        return tokens

    @staticmethod
    def _staff(tokens: Tokens) -> Tokens:
        if not tokens.grant.staff:
            raise SignInError(
                "This account cannot use the staff console.", "not a staff member's token"
            )
        return tokens


@dataclass
class Web:
    """What the console's pages share (``app.state.web``)."""

    settings: Settings
    sessions: SessionStore[ConsoleSession]
    client: StaffClient
    templates: Jinja2Templates
    trail: audit.AuditTrail
    worklist: Worklist
    #: FHIR reads, always with the signed-in staff member's token.
    http: httpx.AsyncClient
    #: How often the live worklist stream looks for new studies and results (seconds).
    live_interval_s: float = 2.0

    async def record(self, event: dict[str, Any]) -> None:
        """Record an AuditEvent (off the event loop: it writes to the database)."""
        await asyncio.to_thread(self.trail.record, event)

    def page(
        self,
        request: Request,
        template: str,
        session: ConsoleSession | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        signed_in = session is not None and session.signed_in
        return self.templates.TemplateResponse(
            request,
            template,
            {
                "session": session if signed_in else None,
                "csrf": session.csrf if signed_in and session else "",
                "roles": session.roles if signed_in and session else (),
                **context,
            },
            status_code=status_code,
        )


class RoleRefused(Exception):
    """The signed-in staff member's role does not allow this."""


def web_state(request: Request) -> Web:
    state: Web | None = getattr(request.app.state, "web", None)
    if state is None:
        raise HTTPException(404, "the console's pages are off (no client secret configured)")
    return state


WebDep = Annotated[Web, Depends(web_state)]


def current_session(request: Request, web: WebDep) -> tuple[ConsoleSession | None, bool]:
    """(this browser's live session, whether the one its cookie named has ended)."""
    return web.sessions.get(request.cookies.get(web.settings.session_cookie))


SessionDep = Annotated[tuple[ConsoleSession | None, bool], Depends(current_session)]


@dataclass
class Staff:
    """The signed-in staff member of a request, with a fresh access token for FHIR."""

    session: ConsoleSession
    token: str

    @property
    def actor(self) -> audit.Actor:
        return self.session.actor


async def fresh_token(web: Web, session: ConsoleSession) -> str:
    """The session's access token, refreshed first when it is (about to be) expired;
    :class:`NeedSignIn` when it can no longer be."""
    async with session.lock:
        account = session.account
        if session.access_token is None or account is None:
            raise NeedSignIn(expired=True)
        tokens = await refreshed_tokens(
            web.client, web.sessions, session, lambda token: web.client.refresh(token, account)
        )
        if tokens is not None:
            session.roles = tokens.grant.roles  # a changed role takes effect here
        return session.access_token


def require_role(*roles: str) -> Callable[..., Awaitable[Staff]]:
    """The dependency a console route declares: a signed-in staff member holding one of
    ``roles``. No session: :class:`NeedSignIn`; another role: :class:`RoleRefused` (403),
    audited as a refused action."""
    allowed = frozenset(roles)

    async def dependency(request: Request, web: WebDep, found: SessionDep) -> Staff:
        session, ended = found
        if session is None or not session.signed_in:
            raise NeedSignIn(expired=ended)
        token = await fresh_token(web, session)
        if not allowed.intersection(session.roles):
            await web.record(
                audit.audit_event(
                    session.actor,
                    audit.SECURITY_ALERT,
                    audit.EXECUTE,
                    audit.REFUSED,
                    detail=f"role refused: {request.method} {request.url.path}"[:200],
                )
            )
            raise RoleRefused()
        return Staff(session, token)

    return dependency


#: The gates the routes declare.
Clinician = Annotated[Staff, Depends(require_role(CLINICIAN))]
TriageStaff = Annotated[Staff, Depends(require_role(CLINICIAN, OPERATOR))]
Admin = Annotated[Staff, Depends(require_role(ADMIN))]


# --- sign-in -------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def home(found: SessionDep) -> Response:
    session = found[0]
    if session is None or not session.signed_in:
        return RedirectResponse("/signin", status_code=303)
    target = next((HOME[r] for r in session.roles if r in HOME), "/signin")
    return RedirectResponse(target, status_code=303)


@router.get("/signin", response_class=HTMLResponse)
async def signin_page(
    request: Request, web: WebDep, found: SessionDep, reason: str | None = None
) -> Response:
    session, ended = found
    if session is not None and session.signed_in:
        return RedirectResponse("/", status_code=303)
    message = SIGN_IN_REASONS.get(reason or "") or (SIGN_IN_REASONS["expired"] if ended else None)
    return web.page(request, "signin.html", None, message=message, title="Sign in")


@router.get("/login")
async def login(web: WebDep, found: SessionDep) -> Response:
    """Start a sign-in: a fresh state and PKCE verifier kept in the session, then off to the
    authorization server."""
    if found[0] is not None and found[0].signed_in:
        return RedirectResponse("/", status_code=303)
    session, url = await start_sign_in(web.client, web.sessions, found[0])
    response = RedirectResponse(url, status_code=303)
    set_session_cookie(response, web.settings, session)
    return response


@router.get("/callback", response_class=HTMLResponse)
async def callback(
    request: Request,
    web: WebDep,
    found: SessionDep,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
) -> Response:
    """Where the authorization server sends staff back: the ``state`` must be the one this
    browser's sign-in sent; the code is exchanged (with the PKCE verifier); the token must be
    a staff member's; the session then starts under a new id."""
    try:
        session, tokens = await complete_sign_in(
            web.sessions,
            found[0],
            web.client.exchange,
            code=code,
            state=state,
            error=error,
            timeout_s=web.settings.login_timeout_s,
        )
    except CallbackRefused as exc:
        if exc.outcome == "bad-state":
            log.info("console sign-in refused", extra={"reason": "state"})
        elif exc.outcome == "failed":
            log.warning("console sign-in failed", extra={"reason": exc.detail})
        return _signin_error(web, request, exc.message)
    session.account = tokens.grant.client_id
    session.roles = tokens.grant.roles
    session.fhir_user = tokens.grant.fhir_user
    await web.record(
        audit.audit_event(session.actor, audit.AUTHENTICATION, audit.EXECUTE, subtype=audit.LOGIN)
    )
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, web.settings, session)
    return response


def _signin_error(web: Web, request: Request, message: str) -> HTMLResponse:
    return web.page(request, "signin.html", None, 400, error=message, title="Sign in")


@router.post("/signout")
async def signout(
    web: WebDep, found: SessionDep, csrf_token: Annotated[str | None, Form()] = None
) -> Response:
    """Revoke the refresh token at the authorization server and end the session."""
    session = found[0]
    if session is not None:
        check_csrf(session, csrf_token)
        if session.signed_in:
            await web.record(
                audit.audit_event(
                    session.actor, audit.AUTHENTICATION, audit.EXECUTE, subtype=audit.LOGOUT
                )
            )
        await sign_out(web.client, web.sessions, session)
    response = RedirectResponse("/signin?reason=signed-out", status_code=303)
    clear_session_cookie(response, web.settings)
    return response


# --- pages of each role ----------------------------------------------------------------------


# The study viewer (/studies/<uid>, /api/studies/<uid>) lives in services/console/viewer.py.


@router.get("/admin", response_class=HTMLResponse)
async def admin_page(request: Request, web: WebDep, staff: Admin) -> Response:
    """Account administration: today the CLI does it; the page says how."""
    await web.record(audit.audit_event(staff.actor, audit.QUERY, audit.EXECUTE, query=["admin"]))
    return web.page(request, "admin.html", staff.session, title="Staff accounts", nav="admin")


# --- the worklist ---------------------------------------------------------------------------


async def _refresh_worklist(request: Request, web: Web, token: str) -> None:
    """Bring the worklist up to date: the index (what is stored), then the AI results changed
    since the last look (read from FHIR with this staff member's token)."""
    console = request.app.state.console
    # A page may answer from an index topped up within WORKLIST_INDEX_AGE_S (the live stream
    # and the background task keep it that fresh): a full top-up stats every folder of the
    # store, 0.1-0.2 s at 10,000 studies, too much for every page view.
    await asyncio.to_thread(console.top_up, time.monotonic() - WORKLIST_INDEX_AGE_S)
    await asyncio.to_thread(web.worklist.map_new_studies)
    try:
        await top_up_results(web.worklist, web.http, web.settings.fhir_base_url, token)
    except (httpx.HTTPError, ValueError) as exc:
        # FHIR unreachable, or not answering FHIR JSON: the list still shows what is
        # stored; results later.
        log.warning("worklist: FHIR results not read", extra={"error": type(exc).__name__})


@router.get("/worklist", response_class=HTMLResponse)
async def worklist_page(
    request: Request, web: WebDep, staff: TriageStaff, page: int = 1, fragment: bool = False
) -> Response:
    """The triage worklist: abnormal first by score, then the longest waiting; filters."""
    params = {k: v for k, v in request.query_params.items() if k not in ("page", "fragment")}
    filters, errors = Filters.parse(params)
    page = max(1, min(page, 10_000))
    await _refresh_worklist(request, web, staff.token)
    rows = await asyncio.to_thread(web.worklist.page, filters, (page - 1) * PAGE_SIZE)
    models = await asyncio.to_thread(web.worklist.models)
    if not fragment:
        await web.record(
            audit.audit_event(staff.actor, audit.QUERY, audit.EXECUTE, query=["worklist", *params])
        )
    return web.page(
        request,
        "worklist_table.html" if fragment else "worklist.html",
        staff.session,
        title="Worklist",
        nav="worklist",
        rows=rows,
        filters=filters,
        params=params,
        errors=errors,
        models=models,
        page_number=page,
        now=datetime.now(),  # StudyDate/StudyTime are the hospital's local time
        more=len(rows) == PAGE_SIZE,
        status_code=400 if errors else 200,
    )


@router.get("/worklist/events")
async def worklist_events(request: Request, web: WebDep, staff: TriageStaff) -> Response:
    """Server-sent events: ``changed`` whenever a study is stored or a result arrives (the
    page then fetches its table again)."""
    session = staff.session

    async def stream() -> AsyncIterator[bytes]:
        last = await asyncio.to_thread(web.worklist.fingerprint)
        yield b": connected\n\n"
        while not await request.is_disconnected():
            await asyncio.sleep(web.live_interval_s)
            try:
                token = await fresh_token(web, session)
            except NeedSignIn:
                yield b"event: signin\ndata: {}\n\n"
                return
            await _refresh_worklist(request, web, token)
            now = await asyncio.to_thread(web.worklist.fingerprint)
            if now != last:
                last = now
                yield b"event: changed\ndata: {}\n\n"
            else:
                yield b": idle\n\n"

    return event_stream(stream())


@router.get("/static/console.css")
async def stylesheet() -> Response:
    return Response(
        (HERE / "static" / "console.css").read_bytes(),
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=3600"},
    )


@router.get("/static/console.js")
async def script() -> Response:
    return Response(
        (HERE / "static" / "console.js").read_bytes(),
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=3600"},
    )


def when(value: object) -> str:
    """A FHIR date or instant as staff read it: ``2025-01-06 09:30 UTC`` (a date stays a
    date; anything else is shown as it came)."""
    text = str(value or "")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if "T" not in text:
        return text
    zone = "UTC" if moment.utcoffset() == timedelta(0) else moment.strftime("%z")
    return f"{moment:%Y-%m-%d %H:%M} {zone}"


def templates() -> Jinja2Templates:
    """The console's templates (autoescaped .html), with the ``when`` filter."""
    found = Jinja2Templates(directory=HERE / "templates")
    found.env.filters["when"] = when
    return found


def create_web(
    settings: Settings,
    index_engine: Engine,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    verifier: Verifier | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Web:
    """The web pages' state (needs ``settings.client_secret``); the worklist's tables live
    in ``index_engine`` (the index's database: both are caches)."""
    return Web(
        settings=settings,
        sessions=SessionStore(
            ConsoleSession, settings.session_idle_s, settings.session_max_s, clock
        ),
        client=StaffClient(settings, transport, verifier, clock),
        templates=templates(),
        trail=audit.AuditTrail(make_engine(settings.audit_url)),
        worklist=Worklist(index_engine),
        http=httpx.AsyncClient(transport=transport, timeout=settings.http_timeout_s),
    )
