"""Composition root of the patient portal: ``create_app(settings)`` wires the session store,
the SMART client, the HTTP client the patient's reads go through, the templates, the routes
and the security headers. Nothing connects until a request needs it: the SMART configuration is
fetched at the first sign-in."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from scanwatch.http_access import MetricsGuard
from services.auth.web_errors import install_error_pages
from services.auth.web_limits import PORTAL_MAX_BODY_BYTES, BodyLimit
from services.auth.web_security import SecurityHeaders
from services.auth.web_sessions import SessionStore
from services.portal import routes
from services.portal.config import Settings
from services.portal.fhir import FhirUnavailable
from services.portal.metrics import PortalMetrics
from services.portal.sessions import Session
from services.portal.smart import SmartClient, Verifier
from services.portal.state import Portal

SERVICE = "portal"
HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    verifier: Verifier | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The portal app. ``transport`` (tests: a fake FHIR, auth server and chatbot) carries
    every outgoing HTTP call; ``verifier`` checks access tokens (default: the JWKS named by the
    SMART configuration); ``clock`` times sessions and tokens."""
    templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html
    http = httpx.AsyncClient(
        transport=transport, timeout=settings.http_timeout_s, follow_redirects=False
    )
    state = Portal(
        settings=settings,
        sessions=SessionStore(Session, settings.session_idle_s, settings.session_max_s, clock),
        smart=SmartClient(settings, transport, verifier, clock),
        http=http,
        templates=templates,
        metrics=PortalMetrics(),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info("portal ready", extra={"url": settings.base_url})
        yield
        await http.aclose()

    app = FastAPI(
        title="scanwatch patient portal",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.portal = state
    app.include_router(routes.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _install_error_handlers(app, state)
    app.add_middleware(BodyLimit, max_bytes=PORTAL_MAX_BODY_BYTES)
    app.add_middleware(SecurityHeaders, hsts=settings.secure_cookies)
    app.add_middleware(MetricsGuard, token=settings.metrics_secret, host=settings.host)
    return app


def _install_error_handlers(app: FastAPI, state: Portal) -> None:
    def error_page(request: Request, status: int, title: str, text: str) -> HTMLResponse:
        return state.templates.TemplateResponse(
            request,
            "error.html",
            {"title": title, "text": text, "signed_in": False, "csrf": "", "session": None},
            status_code=status,
        )

    install_error_pages(app, error_page, "portal")

    @app.exception_handler(FhirUnavailable)
    async def fhir_unavailable(request: Request, exc: FhirUnavailable) -> Response:
        log.warning("FHIR unavailable", extra={"error": str(exc)})
        return error_page(
            request,
            503,
            "Your records cannot be shown right now",
            "The hospital's records system did not answer. Please try again in a few minutes.",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_page(request, 404, "Page not found", "There is no page at this address.")
        return error_page(
            request, exc.status_code, "Something went wrong", "Please go back and try again."
        )
