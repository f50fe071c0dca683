"""The portal's pages and endpoints. Every route that shows records declares
:func:`signed_in`, which yields the session's patient and a FHIR client carrying that patient's
own (fresh) token: a route cannot forget whose records it reads, and no identifier in a URL or
query can change whose they are (the FHIR API's compartment checks the token, and the portal
never sends any patient but the session's)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Form, Header, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)

from services.auth.web_client import (
    CallbackRefused,
    complete_sign_in,
    refreshed_tokens,
    sign_out,
    start_sign_in,
)
from services.auth.web_security import event_stream
from services.auth.web_sessions import (
    NeedSignIn,
    check_csrf,
    clear_session_cookie,
    set_session_cookie,
)
from services.portal import views
from services.portal.fhir import PatientFhir, TokenRejected, newest_update
from services.portal.sessions import ChatLine, Session
from services.portal.smart import (
    AuthServerUnavailable,
)
from services.portal.state import Portal

log = logging.getLogger(__name__)
router = APIRouter()

#: A FHIR logical id (FHIR R4 ``id``): anything else in a URL is "not found" without a request.
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
#: What the sign-in page says, by ``?reason=``.
SIGN_IN_REASONS = {
    "expired": "Your session has ended. Please sign in again to see your records.",
    "signed-out": "You have signed out. Thank you for using the patient portal.",
}
#: What the detail page says the numbers mean.
MEANING = {
    "score": views.SCORE_MEANING,
    "threshold": views.THRESHOLD_MEANING,
    "probabilities": views.PROBABILITY_MEANING,
}
#: Longest chat message forwarded.
MAX_CHAT_CHARS = 1000
#: A comment line on the event stream this often keeps proxies from closing it.
KEEPALIVE_S = 15.0


def portal(request: Request) -> Portal:
    state: Portal = request.app.state.portal
    return state


PortalDep = Annotated[Portal, Depends(portal)]


def current_session(request: Request, app: PortalDep) -> tuple[Session | None, bool]:
    """(this browser's live session, whether the one its cookie named has ended)."""
    return app.sessions.get(request.cookies.get(app.settings.session_cookie))


@dataclass
class SignedIn:
    """The signed-in patient of this request and their records' reader."""

    session: Session
    fhir: PatientFhir


async def fresh_token(app: Portal, session: Session) -> str:
    """The session's access token, refreshed first when it is (about to be) expired;
    :class:`NeedSignIn` when it can no longer be."""
    async with session.lock:
        patient = session.patient
        if session.access_token is None or patient is None:
            raise NeedSignIn(expired=True)
        try:
            tokens = await refreshed_tokens(
                app.smart, app.sessions, session, lambda token: app.smart.refresh(token, patient)
            )
        except NeedSignIn:
            app.metrics.refreshes.labels("ended").inc()
            raise
        if tokens is not None:
            app.metrics.refreshes.labels("refreshed").inc()
        return session.access_token


async def signed_in(
    app: PortalDep, found: Annotated[tuple[Session | None, bool], Depends(current_session)]
) -> SignedIn:
    session, ended = found
    if session is None or not session.signed_in:
        raise NeedSignIn(expired=ended)
    token = await fresh_token(app, session)
    assert session.patient is not None
    return SignedIn(
        session, PatientFhir(app.http, app.settings.fhir_base_url, token, session.patient)
    )


SignedInDep = Annotated[SignedIn, Depends(signed_in)]


def page(
    app: Portal,
    request: Request,
    template: str,
    session: Session | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    return app.templates.TemplateResponse(
        request,
        template,
        {
            "session": session,
            "csrf": session.csrf if session else "",
            "signed_in": bool(session and session.signed_in),
            **context,
        },
        status_code=status_code,
    )


# --- Records -----------------------------------------------------------------------------------


async def _results(app: Portal, fhir: PatientFhir) -> views.ResultsPage:
    observations, studies, reports = await asyncio.gather(
        fhir.results(), fhir.imaging_studies(), fhir.reports()
    )
    return views.results_page(
        observations,
        studies,
        reports,
        app.settings.zone,
        since=newest_update(observations, studies, reports),
    )


@router.get("/", response_class=HTMLResponse)
async def results(request: Request, app: PortalDep, me: SignedInDep) -> Response:
    """The results list and the progress chart."""
    try:
        data = await _results(app, me.fhir)
    except TokenRejected:
        return _token_rejected(app, me.session)
    return page(app, request, "results.html", me.session, results=data, nav="results")


@router.get("/results/fragment", response_class=HTMLResponse)
async def results_fragment(request: Request, app: PortalDep, me: SignedInDep) -> Response:
    """The results section alone: what the page swaps in when the event stream says that
    something changed."""
    try:
        data = await _results(app, me.fhir)
    except TokenRejected:
        return _token_rejected(app, me.session)
    return page(app, request, "_results.html", me.session, results=data)


@router.get("/results/{observation_id}", response_class=HTMLResponse)
async def result(
    request: Request, observation_id: str, app: PortalDep, me: SignedInDep
) -> Response:
    """One result in detail. Another patient's id (or any id the token cannot read) is "not
    found", the same answer as an id that does not exist."""
    detail = None
    if FHIR_ID.match(observation_id):
        try:
            observation = await me.fhir.read("Observation", observation_id)
            if observation is not None and _own(observation, me.session):
                studies, reports = await asyncio.gather(
                    me.fhir.imaging_studies(), me.fhir.reports()
                )
                detail = views.result_detail(observation, studies, reports, app.settings.zone)
        except TokenRejected:
            return _token_rejected(app, me.session)
    if detail is None:
        return page(app, request, "not_found.html", me.session, status_code=404, nav="results")
    return page(
        app, request, "result.html", me.session, detail=detail, meaning=MEANING, nav="results"
    )


def _own(resource: dict[str, Any], session: Session) -> bool:
    """Defence in depth: the resource's subject is the session's patient (the FHIR API's
    compartment already refuses anything else)."""
    subject = (resource.get("subject") or {}).get("reference")
    return bool(subject == f"Patient/{session.patient}")


@router.get("/care", response_class=HTMLResponse)
async def care(request: Request, app: PortalDep, me: SignedInDep) -> Response:
    """Medicines and the next appointment."""
    zone = app.settings.zone
    try:
        requests, appointment = await asyncio.gather(
            me.fhir.medications(), me.fhir.next_appointment(datetime.now(UTC))
        )
    except TokenRejected:
        return _token_rejected(app, me.session)
    return page(
        app,
        request,
        "care.html",
        me.session,
        medications=views.medications(requests, zone),
        visit=views.visit(appointment, zone),
        nav="care",
    )


def _token_rejected(app: Portal, session: Session) -> Response:
    """The FHIR API refused a token the portal thought valid (revoked, keys rotated away):
    the session ends."""
    log.warning("session ended: the FHIR API refused its access token")
    app.end_session(session)
    return RedirectResponse("/signin?reason=expired", status_code=303)


# --- New results without a reload ----------------------------------------------------------


@router.get("/events")
async def events(
    request: Request, app: PortalDep, me: SignedInDep, since: str | None = None
) -> Response:
    """Server-sent events: ``results`` when one of the patient's results or studies was
    written after ``since`` (the page's newest ``meta.lastUpdated``). The portal polls FHIR
    with the session's own token every ``poll_interval_s``; ``signin`` when the session ends."""
    cursor = since if since and len(since) <= 40 else None
    session = me.session

    async def stream() -> AsyncIterator[str]:
        nonlocal cursor
        app.metrics.streams.inc()
        idle = 0.0
        try:
            yield "retry: 2000\n\n"
            # The page was drawn from a read made just now, with ``since`` its newest stamp:
            # the first poll waits one interval instead of repeating that read's work.
            while await _wait_then_connected(request, app.settings.poll_interval_s):
                if app.sessions.get(session.id)[0] is not session:
                    yield "event: signin\ndata: {}\n\n"
                    return
                try:
                    token = await fresh_token(app, session)
                    assert session.patient is not None
                    fhir = PatientFhir(app.http, app.settings.fhir_base_url, token, session.patient)
                    newest = await fhir.updated_since(cursor)
                except (NeedSignIn, TokenRejected):
                    yield "event: signin\ndata: {}\n\n"
                    return
                except Exception:  # noqa: BLE001 - FHIR down: keep the stream, try again
                    log.warning("event stream: FHIR poll failed", exc_info=True)
                    newest = None
                if newest is not None:
                    cursor = newest
                    idle = 0.0
                    yield f"event: results\ndata: {json.dumps({'since': newest})}\n\n"
                elif idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                idle += app.settings.poll_interval_s
        finally:
            app.metrics.streams.dec()

    return event_stream(stream())


async def _wait_then_connected(request: Request, seconds: float) -> bool:
    """False once the browser has gone: checked after each poll interval."""
    await asyncio.sleep(seconds)
    return not await request.is_disconnected()


# --- Chat ------------------------------------------------------------------------------------


@router.get("/chat", response_class=HTMLResponse)
async def chat_page(request: Request, app: PortalDep, me: SignedInDep) -> Response:
    return page(app, request, "chat.html", me.session, lines=me.session.chat, nav="chat")


async def _ask(app: Portal, me: SignedIn, text: str) -> list[ChatLine]:
    """Forward one message to the chatbot with the patient's token; the bot's lines."""
    token = await fresh_token(app, me.session)
    try:
        answer = await app.http.post(
            app.settings.chat_url,
            json={"message": text},
            headers={"Authorization": f"Bearer {token}"},
        )
    except httpx.HTTPError:
        app.metrics.chat.labels("unavailable").inc()
        return [ChatLine("bot", "The chat assistant is not available right now. Please try later.")]
    if answer.status_code == 429:
        app.metrics.chat.labels("rate-limited").inc()
        return [ChatLine("bot", "That was a lot of messages at once. Please wait a moment.")]
    if answer.status_code == 401:
        app.metrics.chat.labels("refused").inc()
        raise NeedSignIn(expired=True)
    try:
        messages = answer.json() if answer.status_code == 200 else None
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        messages = None
    if not isinstance(messages, list):
        app.metrics.chat.labels("failed").inc()
        return [ChatLine("bot", "The chat assistant could not answer. Please try again later.")]
    app.metrics.chat.labels("answered").inc()
    lines = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        buttons = [
            (str(b.get("title", "")), str(b.get("payload", "")))
            for b in message.get("buttons") or []
            if isinstance(b, dict)
        ]
        if message.get("text") or buttons:
            lines.append(ChatLine("bot", str(message.get("text") or ""), buttons))
    return lines


@router.post("/chat")
async def chat_send(
    request: Request,
    app: PortalDep,
    me: SignedInDep,
    message: Annotated[str, Form(max_length=MAX_CHAT_CHARS)] = "",
    payload: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str | None, Form()] = None,
    x_csrf_token: Annotated[str | None, Header()] = None,
    accept: Annotated[str, Header()] = "",
) -> Response:
    """A chat message (typed, or a button's payload): forwarded, answered. Scripts get the
    new lines as JSON; a plain form post comes back to the chat page."""
    check_csrf(me.session, x_csrf_token or csrf_token)
    said = message.strip()
    sent = payload.strip() if payload.strip().startswith("/") else said
    if not sent:
        return _chat_answer(accept, [])
    shown = said or next(
        (title for line in me.session.chat for title, p in line.buttons if p == sent), sent
    )
    mine = ChatLine("you", shown)
    me.session.add_chat(mine)
    replies = await _ask(app, me, sent)
    for line in replies:
        me.session.add_chat(line)
    return _chat_answer(accept, [mine, *replies])


def _chat_answer(accept: str, lines: list[ChatLine]) -> Response:
    if "application/json" in accept:
        return JSONResponse(
            [
                {
                    "speaker": line.speaker,
                    "text": line.text,
                    "buttons": [{"title": t, "payload": p} for t, p in line.buttons],
                }
                for line in lines
            ]
        )
    return RedirectResponse("/chat#latest", status_code=303)


# --- Signing in and out ----------------------------------------------------------------------


@router.get("/signin", response_class=HTMLResponse)
async def signin_page(
    request: Request,
    app: PortalDep,
    found: Annotated[tuple[Session | None, bool], Depends(current_session)],
    reason: str | None = None,
) -> Response:
    session, ended = found
    if session is not None and session.signed_in:
        return RedirectResponse("/", status_code=303)
    message = SIGN_IN_REASONS.get(reason or "") or (SIGN_IN_REASONS["expired"] if ended else None)
    # An ended session's cookie stays until the next sign-in replaces it: it names no session,
    # and every tab that still sends it is told why it must sign in again.
    return page(app, request, "signin.html", None, message=message, nav="signin")


@router.get("/login")
async def login(
    app: PortalDep, found: Annotated[tuple[Session | None, bool], Depends(current_session)]
) -> Response:
    """Start a sign-in: a fresh state and PKCE verifier kept in the session, then off to the
    authorization server."""
    if found[0] is not None and found[0].signed_in:
        # Signed in already: another patient signs in only after this one signs out, so that
        # nothing of this session (its chat transcript) can reach the next one.
        return RedirectResponse("/", status_code=303)
    try:
        session, url = await start_sign_in(app.smart, app.sessions, found[0])
    except AuthServerUnavailable as exc:
        log.warning("sign-in: authorization server unavailable", extra={"error": str(exc)})
        raise
    response = RedirectResponse(url, status_code=303)
    set_session_cookie(response, app.settings, session)
    return response


@router.get("/callback", response_class=HTMLResponse)
async def callback(
    request: Request,
    app: PortalDep,
    found: Annotated[tuple[Session | None, bool], Depends(current_session)],
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
) -> Response:
    """Where the authorization server sends the patient back: the ``state`` must be the one
    this browser's sign-in sent, then the code is exchanged (with the PKCE verifier) and the
    session starts under a new id."""
    try:
        session, tokens = await complete_sign_in(
            app.sessions,
            found[0],
            app.smart.exchange,
            code=code,
            state=state,
            error=error,
            timeout_s=app.settings.login_timeout_s,
        )
    except CallbackRefused as exc:
        app.metrics.sign_ins.labels(exc.outcome).inc()
        if exc.outcome == "failed":
            log.warning("sign-in failed", extra={"reason": exc.detail})
        return _signin_error(app, request, exc.message)
    session.patient = tokens.patient
    app.metrics.sign_ins.labels("completed").inc()
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, app.settings, session)
    return response


def _signin_error(app: Portal, request: Request, message: str) -> HTMLResponse:
    return page(app, request, "signin.html", None, status_code=400, error=message, nav="signin")


@router.post("/signout")
async def signout(
    app: PortalDep,
    found: Annotated[tuple[Session | None, bool], Depends(current_session)],
    csrf_token: Annotated[str | None, Form()] = None,
) -> Response:
    """Revoke the refresh token at the authorization server and end the session."""
    session = found[0]
    if session is not None:
        check_csrf(session, csrf_token)
        await sign_out(app.smart, app.sessions, session)
    response = RedirectResponse("/signin?reason=signed-out", status_code=303)
    clear_session_cookie(response, app.settings)
    return response


# --- Service endpoints -----------------------------------------------------------------------


@router.get("/healthz")
async def healthz() -> Response:
    """The process answers (it holds no connection of its own to check)."""
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(app: PortalDep) -> Response:
    app.metrics.sessions.set(len(app.sessions))
    return Response(app.metrics.exposition(), media_type="text/plain; version=0.0.4")


#: The npm files the pages load, by the name they are served under (nothing else of
#: node_modules is reachable).
VENDOR_FILES = {"chart.umd.min.js": ("chart.js", "dist", "chart.umd.min.js")}


@router.get("/static/vendor/{name}")
async def vendor(name: str, app: PortalDep) -> Response:
    parts = VENDOR_FILES.get(name)
    path = app.settings.assets_dir.joinpath(*parts) if parts else None
    if path is None or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(
        path,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=3600"},
    )
