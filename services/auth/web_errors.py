"""The answers a web app that signs people in (the patient portal, the staff console) gives
when a request cannot go on: sign in first, a form that has expired, the authorization server
not answering. Each app draws the page in its own look (``error_page``); what is said, and
when a script or an event stream gets JSON rather than a page, is written here once."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from services.auth.web_client import AuthServerUnavailable
from services.auth.web_limits import BodyTooLarge
from services.auth.web_sessions import CsrfRejected, NeedSignIn

log = logging.getLogger(__name__)

#: Draws an app's error page: (request, status, title, text).
ErrorPage = Callable[[Request, int, str, str], Response]


def wants_html(request: Request) -> bool:
    """Whether the request is a browser's page load (a GET, not of ``/api/`` nor an event
    stream): it gets a page or a redirect; a script or a stream gets JSON."""
    return (
        request.method == "GET"
        and not request.url.path.startswith("/api/")
        and "text/event-stream" not in request.headers.get("accept", "")
    )


def install_error_pages(app: FastAPI, error_page: ErrorPage, name: str) -> None:
    """The handlers of :class:`NeedSignIn` (a page load: to the sign-in page; else 401 with
    where to sign in), :class:`CsrfRejected` (403), :class:`BodyTooLarge` (413) and
    :class:`AuthServerUnavailable` (503);
    ``name`` is what the pages call the app ("portal", "console")."""

    @app.exception_handler(NeedSignIn)
    async def need_sign_in(request: Request, exc: NeedSignIn) -> Response:
        target = "/signin?reason=expired" if exc.expired else "/signin"
        if wants_html(request):
            return RedirectResponse(target, status_code=303)
        return JSONResponse({"status": 401, "signin": target}, status_code=401)

    @app.exception_handler(CsrfRejected)
    async def csrf_rejected(request: Request, _exc: CsrfRejected) -> Response:
        return error_page(
            request,
            403,
            "This form has expired",
            f"The page you sent it from was too old or not from this {name}. Go back, reload "
            "the page and try again.",
        )

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> Response:
        return error_page(
            request,
            413,
            "What you sent is too large",
            f"This {name} accepts at most {exc.max_bytes // 1024} KiB in one form. Go back, "
            "shorten what you typed and send it again.",
        )

    @app.exception_handler(AuthServerUnavailable)
    async def auth_unavailable(request: Request, exc: AuthServerUnavailable) -> Response:
        log.warning("authorization server unavailable", extra={"error": str(exc)})
        return error_page(
            request,
            503,
            "Signing in is not possible right now",
            "The hospital's sign-in service did not answer. Please try again in a few minutes.",
        )
