"""Composition root of the FHIR API: ``create_app(settings)`` wires the store, the routes, the
error handlers and the metrics. Nothing touches the database until the app starts."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.fhir_api.config import Settings
from services.fhir_api.errors import (
    EXCEPTION,
    INVALID,
    NOT_FOUND,
    NOT_SUPPORTED,
    TRANSIENT,
    FhirError,
    FhirJSONResponse,
    operation_outcome,
)
from services.fhir_api.routes import build_router
from services.fhir_api.store import ResourceStore, make_engine

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the API over ``settings.database_url`` (or an injected ``engine``)."""
    engine = engine if engine is not None else make_engine(settings.database_url)
    store = ResourceStore(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        store.create_schema()
        log.info("FHIR API ready", extra={"database": engine.url.get_backend_name()})
        yield
        engine.dispose()

    app = FastAPI(
        title="scanwatch FHIR API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.store = store
    started = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    app.include_router(build_router(store, settings, started))
    _install_error_handlers(app)
    _install_metrics(app)

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


def _install_metrics(app: FastAPI) -> None:
    """Request counts and latencies by route template (never by id), at ``/metrics``."""
    registry = CollectorRegistry()
    requests = Counter(
        "fhir_api_requests",
        "HTTP requests answered",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "fhir_api_request_seconds", "Request latency", ["method", "route"], registry=registry
    )

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        latency.labels(request.method, route).observe(time.perf_counter() - start)
        requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
