"""Who may read an HTTP service's operational endpoints, and its TLS files: shared by every
service with an HTTP port (the FHIR API, the console, the portal, the listener's health server,
the worker's web page, the model server's metrics port).

``/metrics`` is guarded by a static bearer token (``SCANWATCH_<SVC>_METRICS_TOKEN``), the
credential Prometheus sends (``authorization: credentials_file``): when the token is set every
scrape must carry it. Without one, ``/metrics`` is open on loopback (development) and closed
(401 to everyone) on an address other machines can reach: it fails closed, and the service
says so at start-up (:func:`metrics_closed_warning`). ``/healthz`` stays open: it says whether
the service can work, with no patient data, and orchestrators probe it without credentials.

No framework import: plain ASGI and WSGI wrappers, and :func:`bearer_matches` for the others.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer

from scanwatch.network import is_loopback

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
#: The challenge a refused scrape gets (RFC 6750).
METRICS_CHALLENGE = 'Bearer realm="metrics"'
REFUSED_BODY = json.dumps(
    {"status": 401, "error": "/metrics needs the metrics bearer token"}
).encode()

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as its bearer credential (compared
    in constant time)."""
    scheme, _, credential = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return False
    return hmac.compare_digest(credential.strip().encode(), token.encode())


def metrics_allowed(authorization: str | None, token: str | None, host: str) -> bool:
    """Whether a request with this ``Authorization`` header may read ``/metrics`` of a service
    bound to ``host``: with a token, only its bearer; without one, anyone on loopback and
    nobody elsewhere."""
    if token:
        return bearer_matches(authorization, token)
    return is_loopback(host)


def metrics_closed_warning(host: str, token: str | None, setting: str) -> None:
    """Log, once at start-up, that ``/metrics`` refuses every scrape (bound off loopback, no
    token), naming the setting that opens it to Prometheus."""
    if not token and not is_loopback(host):
        log.warning(
            "/metrics refuses every scrape: the service is reachable from other machines and "
            "has no metrics token",
            extra={"host": host, "setting": setting},
        )


class MetricsGuard:
    """ASGI middleware: ``/metrics`` answers 401 unless :func:`metrics_allowed`."""

    def __init__(self, app: ASGIApp, token: str | None, host: str) -> None:
        self.app = app
        self.token = token
        self.host = host

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != METRICS_PATH:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if metrics_allowed(authorization, self.token, self.host):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", METRICS_CHALLENGE.encode()),
                    (b"content-length", str(len(REFUSED_BODY)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": REFUSED_BODY})


def guard_wsgi(app: WSGIApp, token: str | None, host: str) -> WSGIApp:
    """The WSGI twin of :class:`MetricsGuard` (the listener's and the model server's metrics
    servers): every path but ``/healthz`` needs :func:`metrics_allowed`."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == HEALTH_PATH or metrics_allowed(
            environ.get("HTTP_AUTHORIZATION"), token, host
        ):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "application/json"), ("WWW-Authenticate", METRICS_CHALLENGE)],
        )
        return [REFUSED_BODY]

    return guarded


def check_tls_pair(cert_file: Path | None, key_file: Path | None, prefix: str) -> None:
    """Both TLS files or neither, and both readable files (:class:`ValueError` naming the
    settings ``<prefix>TLS_CERT_FILE`` / ``<prefix>TLS_KEY_FILE`` otherwise)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError(f"set {prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE together")
    for name, path in (("TLS_CERT_FILE", cert_file), ("TLS_KEY_FILE", key_file)):
        if path is not None and not path.is_file():
            raise ValueError(f"{prefix}{name}: {path} is not a file")


def uvicorn_tls(cert_file: Path | None, key_file: Path | None) -> dict[str, str]:
    """uvicorn's ``ssl_certfile`` / ``ssl_keyfile`` for these files (empty: plain HTTP)."""
    if cert_file is None or key_file is None:
        return {}
    return {"ssl_certfile": str(cert_file), "ssl_keyfile": str(key_file)}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # no access log: paths and callers are not worth a line each scrape


class HttpServer:
    """A WSGI app served by threads in a daemon thread (the listener's health and metrics
    port, the model server's metrics port)."""

    def __init__(self, host: str, port: int, app: WSGIApp) -> None:
        self._server = make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
