"""Composition root of the console: ``create_app(settings)`` wires the instance index (its
database engine), the token verifier, the DICOMweb routes, ``/healthz`` and ``/metrics``.
Nothing connects at import or creation: the index opens its tables at the first top-up (in the
background at start-up) and the JWKS is fetched at the first request that brings a token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from scanwatch.database import make_engine
from scanwatch.http_access import MetricsGuard
from scanwatch.http_metrics import RequestMetrics
from scanwatch.kafka import EventProducer
from services.auth.jwks import KeySetUnavailable, RemoteKeySet
from services.auth.scopes import AuthError
from services.auth.web_errors import install_error_pages, wants_html
from services.auth.web_limits import CONSOLE_MAX_BODY_BYTES, BodyLimit
from services.auth.web_security import SecurityHeaders
from services.console import dicomweb, operator_web, review_web, viewer, web
from services.console.auth import CHALLENGE, FileKeySet, Verifier
from services.console.config import Settings
from services.console.dead_letters import DeadLetterReader
from services.console.dicomweb import Console, DicomWebError
from services.console.index import StoreIndex
from services.console.metrics import ConsoleMetrics
from services.console.openapi import OPENAPI_PATH, openapi_document
from services.console.training_ops import TrainingFeed

SERVICE = "console"
log = logging.getLogger(__name__)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": status, "error": message}, status_code=status, headers=headers)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    verifier: Verifier | None = None,
    web_state: web.Web | None = None,
) -> FastAPI:
    """The console app. ``engine`` (default: ``settings.index_url``) holds the index;
    ``verifier`` checks tokens (default: the JWK Set file, else the JWKS URL); ``web_state``
    serves the staff pages (default: made from ``settings`` when it has a client secret;
    without one only DICOMweb is served)."""
    engine = engine or make_engine(settings.index_url)
    if verifier is None:
        if settings.jwks_file is not None:
            keys = FileKeySet(settings.jwks_file)
            verifier = Verifier(keys.key, settings.token_audience, settings.token_issuer)
        else:
            remote = RemoteKeySet(
                settings.jwks_url, settings.jwks_ttl_s, issuer=settings.token_issuer
            )
            verifier = Verifier.remote(remote, settings.token_audience)
    metrics = ConsoleMetrics()
    state = Console(settings, engine, StoreIndex(settings.storage_dir, engine), verifier, metrics)

    async def keep_topped_up() -> None:
        # Searches top the index up themselves; this keeps the work per search small after
        # a burst of stores, and builds the index of an existing store at start-up.
        while True:
            try:
                await asyncio.to_thread(state.top_up)
            except Exception:  # a transient database or file-system failure: try again later
                log.exception("index top-up failed")
            await asyncio.sleep(settings.scan_interval_s)

    if web_state is None and settings.web:
        web_state = web.create_web(settings, engine)
    reader = (
        DeadLetterReader(settings.kafka_bootstrap_servers, web_state.worklist)
        if web_state is not None and settings.kafka_bootstrap_servers
        else None
    )

    kafka_servers = settings.kafka_bootstrap_servers
    operations = operator_web.Operations(
        repository=settings.model_repository,
        bootstrap_servers=kafka_servers,
        listener_health_url=settings.listener_health_url,
        model_server=settings.model_server,
        model_name=settings.model_name,
        feed=TrainingFeed(kafka_servers) if web_state is not None and kafka_servers else None,
        producer=EventProducer(kafka_servers, "scanwatch-console", timeout_s=10)
        if kafka_servers
        else None,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(keep_topped_up())
        if reader is not None:
            reader.start()  # failed studies for the worklist (its own thread)
        if operations.feed is not None:
            operations.feed.start()  # training jobs and lifecycle answers (its own thread)
        log.info("console ready", extra={"store": str(settings.storage_dir)})
        yield
        if reader is not None:
            await asyncio.to_thread(reader.stop)
        await asyncio.to_thread(operations.stop)
        if web_state is not None:
            await web_state.http.aclose()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(
        title="scanwatch console",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_PATH,
    )
    document = openapi_document(app.title, app.version)
    app.openapi = lambda: document  # type: ignore[method-assign]
    app.state.console = state
    app.include_router(dicomweb.router)
    app.state.web = web_state
    app.include_router(web.router)
    app.include_router(viewer.router)
    app.state.operations = operations
    app.include_router(operator_web.router)
    app.include_router(review_web.router)
    _install_web_handlers(app)

    @app.get("/healthz")
    def healthz() -> Response:
        if not settings.storage_dir.is_dir():
            return _error(503, "the file store is not there")
        return JSONResponse({"status": "ok", "instances": state.index.instances_indexed})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(DicomWebError)
    async def dicomweb_error(_request: Request, exc: DicomWebError) -> Response:
        headers = {"Allow": "GET"} if exc.status == 405 else None
        return _error(exc.status, exc.message, headers)

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, exc: AuthError) -> Response:
        missing = not request.headers.get("authorization")
        challenge = CHALLENGE if missing else exc.www_authenticate
        return _error(exc.status, exc.message, {"WWW-Authenticate": challenge})

    @app.exception_handler(KeySetUnavailable)
    async def keys_unavailable(_request: Request, exc: KeySetUnavailable) -> Response:
        log.warning("token keys unavailable", extra={"error": str(exc)})
        return _error(503, "the authorization server's keys cannot be fetched; try again")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    app.add_middleware(BodyLimit, max_bytes=CONSOLE_MAX_BODY_BYTES)
    # The pages' CSP and headers; DICOMweb answers viewers of other origins, left alone.
    app.add_middleware(SecurityHeaders, hsts=settings.secure_cookies, skip=("/dicomweb",))
    app.add_middleware(RequestMetrics, requests=metrics.requests, latency=metrics.latency)
    app.add_middleware(MetricsGuard, token=settings.metrics_secret, host=settings.host)
    return app


def _install_web_handlers(app: FastAPI) -> None:
    def error_page(request: Request, status: int, title: str, text: str) -> Response:
        state: web.Web | None = app.state.web
        if state is None or not wants_html(request):
            return _error(status, text)
        found = state.sessions.get(request.cookies.get(state.settings.session_cookie))[0]
        return state.page(request, "message.html", found, status, title=title, text=text)

    install_error_pages(app, error_page, "console")

    @app.exception_handler(web.RoleRefused)
    async def role_refused(request: Request, _exc: web.RoleRefused) -> Response:
        return error_page(
            request, 403, "Not for your role", "Your role does not give access to this page."
        )
