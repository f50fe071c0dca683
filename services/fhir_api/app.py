"""Composition root of the FHIR API: ``create_app(settings)`` wires the store, the routes, the
error handlers and the metrics. Nothing touches the database until the app starts.

``prepare_database`` (migrations, bootstrap clients) runs once per start: in the app's
start-up when it is served alone (tests, embedding), or by ``scanwatch-fhir-api serve`` before
it starts the worker processes, each of which builds its app with :func:`worker_app`."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scanwatch.database import make_engine
from scanwatch.http_access import MetricsGuard
from scanwatch.http_metrics import RequestMetrics
from scanwatch.logs import configure_logging
from scanwatch.processes import die_with_parent
from services.auth import clients
from services.auth import routes as auth_routes
from services.auth.config import AuthSettings
from services.auth.scopes import AuthError
from services.auth.server import SmartServer
from services.auth.tokens import TokenService, load_key_set
from services.auth.web_limits import FHIR_MAX_BODY_BYTES, BodyLimit
from services.fhir_api import metrics, migrate, routes
from services.fhir_api.config import Settings
from services.fhir_api.errors import (
    EXCEPTION,
    FORBIDDEN,
    INVALID,
    LOGIN,
    NOT_FOUND,
    NOT_SUPPORTED,
    TRANSIENT,
    FhirError,
    FhirJSONResponse,
    operation_outcome,
)
from services.fhir_api.metrics import FhirApiMetrics
from services.fhir_api.openapi import openapi_document
from services.fhir_api.store import ResourceStore
from services.fhir_api.subscriptions import SubscriptionManager

SERVICE = "fhir-api"
log = logging.getLogger(__name__)
#: Where the OpenAPI document of the FHIR routes is served (no token needed).
OPENAPI_PATH = "/openapi.json"


def token_service(settings: Settings) -> TokenService:
    """The token issuer/verifier of these settings (the CLI uses the same one): the key set in
    ``signing_keys_file``, created on first start; :class:`ValueError` when it is unsafe."""
    keys = load_key_set(settings.signing_keys_file)
    return TokenService(keys, timedelta(seconds=settings.token_lifetime_s))


def prepare_database(engine: Engine, settings: Settings) -> None:
    """What must happen once before any process serves: schema migrations (unless
    ``migrate_on_start`` is off) and the bootstrap clients."""
    if settings.migrate_on_start:
        migrate.upgrade(engine)
    for client_id, secret, scopes in settings.bootstrap_client_entries():
        clients.register_client(engine, client_id, scopes, secret=secret)


def worker_app() -> FastAPI:
    """The app of one ``serve`` worker process (a uvicorn factory): settings from the
    environment, database already prepared by the parent process."""
    settings = Settings()
    configure_logging(SERVICE, settings.log_level)
    _exit_with_parent()
    return create_app(settings, database_prepared=True)


def _exit_with_parent() -> None:
    """Ask Linux to stop this worker when the ``serve`` process dies, even by SIGKILL (uvicorn
    stops its workers only on a signal it can catch; orphans would keep the port)."""
    if sys.platform == "linux" and not die_with_parent(signal.SIGTERM):
        log.warning(
            "cannot tie the worker's life to its parent's", extra={"errno": ctypes.get_errno()}
        )


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    database_prepared: bool = False,
    auth_settings: AuthSettings | None = None,
) -> FastAPI:
    """Build the API over ``settings.database_url`` (or an injected ``engine``); its start-up
    runs :func:`prepare_database` unless ``database_prepared``. With tokens required it also
    serves the SMART authorization server (``auth_settings``, else ``SCANWATCH_AUTH_*``)."""
    engine = engine if engine is not None else make_engine(settings.database_url)
    store = ResourceStore(engine)
    tokens = token_service(settings) if settings.auth_mode == "required" else None
    auth_settings = auth_settings if auth_settings is not None else AuthSettings()
    smart_server = SmartServer(engine, tokens, auth_settings, settings.base_url) if tokens else None
    api_metrics = FhirApiMetrics()
    subscriptions = SubscriptionManager(
        store,
        settings.subscription_max_attempts,
        settings.subscription_backoff_s,
        settings.subscription_timeout_s,
        api_metrics.deliveries,
        settings.subscription_poll_s,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not database_prepared:
            prepare_database(engine, settings)
        if tokens is None:
            log.warning("authorization is off: development on loopback only")
        await subscriptions.start()
        log.info(
            "FHIR API ready",
            extra={
                "database": engine.url.get_backend_name(),
                "pid": os.getpid(),
                "notifier": subscriptions.is_notifier,
            },
        )
        yield
        await subscriptions.stop()
        engine.dispose()

    app = FastAPI(
        title="scanwatch FHIR API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_PATH,
    )
    document = openapi_document(app.title, app.version)
    app.openapi = lambda: document  # type: ignore[method-assign]
    # What the routers' dependencies read (services/fhir_api/deps.py, services/auth/deps.py).
    app.state.settings = settings
    app.state.store = store
    app.state.tokens = tokens
    app.state.client_engine = engine
    app.state.auth_settings = auth_settings
    app.state.smart_server = smart_server
    app.state.subscriptions = subscriptions
    app.state.metrics = api_metrics
    app.state.started = routes.started_now()
    app.include_router(auth_routes.router)
    app.include_router(routes.router)
    app.include_router(metrics.router)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=FHIR_MAX_BODY_BYTES)
    app.add_middleware(RequestMetrics, requests=api_metrics.requests, latency=api_metrics.latency)
    app.add_middleware(MetricsGuard, token=settings.metrics_secret, host=settings.host)

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            store.ping()
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            log.warning("database does not answer", exc_info=True)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OperationOutcome, including the framework's own."""

    @app.exception_handler(FhirError)
    async def fhir_error(_request: Request, exc: FhirError) -> Response:
        return exc.response()

    @app.exception_handler(AuthError)
    async def auth_error(_request: Request, exc: AuthError) -> Response:
        return FhirJSONResponse(
            operation_outcome(exc.message, FORBIDDEN if exc.status == 403 else LOGIN),
            status_code=exc.status,
            headers={"WWW-Authenticate": exc.www_authenticate},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: NOT_FOUND, 405: NOT_SUPPORTED}.get(exc.status_code, INVALID)
        return FhirJSONResponse(
            operation_outcome(str(exc.detail), code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_request: Request, exc: RequestValidationError) -> Response:
        problems = [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        ]
        return FhirJSONResponse(operation_outcome(problems, INVALID), status_code=400)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> Response:
        log.warning("database error", extra={"path": request.url.path, "error": str(exc.orig)})
        return FhirJSONResponse(
            operation_outcome("the database is unavailable; retry later", TRANSIENT),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return FhirJSONResponse(
            operation_outcome(f"internal error ({type(exc).__name__})", EXCEPTION),
            status_code=500,
        )
