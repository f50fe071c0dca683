"""The largest request body an HTTP service reads, enforced before anything parses it: plain
ASGI middleware shared by the FHIR API (with the authorization server's routes), the patient
portal and the console.

A ``Content-Length`` over the limit is refused at the first read, without reading a byte of
the body; a body without one (chunked) is counted as it arrives and refused the moment it
passes the limit. The refusal is :class:`BodyTooLarge`, an ``HTTPException(413)``, so each app
answers it in its own form (the FHIR API: an OperationOutcome; the console: its JSON error; the
portal: its error page) and a route that never reads its body is not refused at all. Memory
per request stays below the limit, whatever the client sends.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The FHIR API and the authorization server's forms (a transaction Bundle of a review with
#: its resources is a few kilobytes; a whole patient's Bundle stays well below this).
FHIR_MAX_BODY_BYTES = 1_000_000
#: The console's forms (a report's conclusion, a prescription, a training job): 256 KiB.
CONSOLE_MAX_BODY_BYTES = 256 * 1024
#: The portal's forms (a chat message, sign-out): 64 KiB.
PORTAL_MAX_BODY_BYTES = 64 * 1024


class BodyTooLarge(HTTPException):
    """A request body larger than the app accepts (413)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")
        self.max_bytes = max_bytes


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (see the module's description)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        too_large = declared is not None and declared > self.max_bytes
        received = 0
        answering = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                if answering:  # a streaming answer listening for the client to go
                    return {"type": "http.disconnect"}
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, watched_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app sees it
    return None
