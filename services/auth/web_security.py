"""Response headers every answer of a web app carries (the patient portal, the staff console):
a Content-Security-Policy that lets pages run only the app's own scripts (no inline script, no
CDN), no framing, no sniffing, no referrer, and no caching of pages that hold health data."""

from __future__ import annotations

from collections.abc import AsyncIterable

from starlette.datastructures import MutableHeaders
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Scripts, styles, images and connections from the app itself only; forms post only to it.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


#: A server-sent event stream's headers: never stored, never held back by a buffering proxy.
EVENT_STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def event_stream(events: AsyncIterable[str] | AsyncIterable[bytes]) -> StreamingResponse:
    """A server-sent event stream (``text/event-stream``) of ``events``, each one already
    framed (``event: changed\\ndata: {}\\n\\n``, a ``: comment\\n\\n`` to keep it open)."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers=dict(EVENT_STREAM_HEADERS)
    )


#: How long browsers keep an app's static files (its own scripts and styles, npm packages).
STATIC_CACHE = "public, max-age=3600"


class SecurityHeaders:
    """Plain ASGI middleware adding :data:`HEADERS` (and HSTS over HTTPS) to every response;
    ``Cache-Control: no-store`` except on static files, unless the route set its own."""

    def __init__(self, app: ASGIApp, hsts: bool, skip: tuple[str, ...] = ()) -> None:
        self.app = app
        self.hsts = hsts
        #: Path prefixes left alone (an API that other origins' viewers read, e.g. DICOMweb).
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.skip):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                # The app's own scripts and styles (no PHI) may be cached a while; every
                # page and answer that may hold health data is not stored at all.
                static = scope.get("path", "").startswith("/static/")
                headers.setdefault("Cache-Control", STATIC_CACHE if static else "no-store")
                if self.hsts:
                    headers.setdefault("Strict-Transport-Security", "max-age=31536000")
            await send(message)

        await self.app(scope, receive, send_with_headers)
