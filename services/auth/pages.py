"""The authorization server's own web pages (sign-in, activation): Jinja2 templates with
autoescaping, a double-submit CSRF token, and the security headers every page carries.

Cookies of these pages are named ``scanwatch_auth_*`` and scoped to ``/auth``: the portal runs
on the same host (another port), and browsers do not keep cookies apart by port. They are
HttpOnly, SameSite=Lax, and Secure unless the page was reached over plain http on loopback.

The pages run no script at all (``script-src`` falls back to ``default-src 'none'``) and load
only their stylesheet. ``form-action`` names the client's redirect URI origin too: Chromium
applies it to the redirect that follows a form post (the code sent back to the app).
"""

from __future__ import annotations

import secrets
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from scanwatch.network import is_loopback

HERE = Path(__file__).resolve().parent
#: The CSRF cookie and the form field that must carry the same value.
CSRF_COOKIE = "scanwatch_auth_csrf"
CSRF_FIELD = "csrf_token"
COOKIE_PATH = "/auth"
STYLESHEET = HERE / "static" / "auth.css"


@cache
def environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute http(s) URL, else None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(form_targets: tuple[str, ...] = ()) -> str:
    targets = " ".join(("'self'", *form_targets))
    return (
        "default-src 'none'; style-src 'self'; img-src 'self'; "
        f"form-action {targets}; frame-ancestors 'none'; base-uri 'none'"
    )


def security_headers(form_targets: tuple[str, ...] = ()) -> dict[str, str]:
    """Headers of every page (and of the redirects and errors answered to a browser)."""
    return {
        "Content-Security-Policy": content_security_policy(form_targets),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def secure_cookies(request: Request) -> bool:
    """Whether this page's cookies must be Secure: always, but on plain http to loopback."""
    return request.url.scheme == "https" or not is_loopback(request.url.hostname or "")


def csrf_token(request: Request) -> str:
    """The CSRF value of this browser: its cookie's, or a new one (set by :func:`page`)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    return current if 40 <= len(current) <= 64 else secrets.token_urlsafe(32)


def csrf_ok(request: Request, form: dict[str, str]) -> bool:
    """Whether the form carries the CSRF value of the browser's cookie."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD, "")
    # Bytes: compare_digest refuses str with non-ASCII characters (a forged form's).
    return bool(cookie) and bool(sent) and secrets.compare_digest(cookie.encode(), sent.encode())


def page(
    request: Request,
    template: str,
    context: dict[str, Any],
    status: int = 200,
    form_targets: tuple[str, ...] = (),
    csrf: str | None = None,
) -> Response:
    """Render ``template``; with ``csrf``, set the CSRF cookie to it."""
    html = environment().get_template(template).render(**context)
    response = HTMLResponse(html, status_code=status, headers=security_headers(form_targets))
    if csrf is not None:
        response.set_cookie(
            CSRF_COOKIE,
            csrf,
            path=COOKIE_PATH,
            httponly=True,
            samesite="lax",
            secure=secure_cookies(request),
        )
    return response


def message(
    request: Request,
    title: str,
    text: str,
    status: int = 200,
    link: str | None = None,
    link_text: str | None = None,
) -> Response:
    """A page that only says something (an error, a confirmation)."""
    context = {
        "title": title,
        "message": text,
        "alert": status >= 400,
        "link": link,
        "link_text": link_text,
    }
    return page(request, "message.html", context, status)


@cache
def stylesheet() -> bytes:
    return STYLESHEET.read_bytes()
