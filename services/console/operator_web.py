"""The operator's pages: models (versions, reports, promote, roll back), training jobs (start
one, follow it epoch by epoch) and pipeline health (the listener, consumer lag, dead letters
and their re-drive). Every page and action needs the ``operator`` role; every action is an
AuditEvent. The data: :mod:`services.console.training_ops` and :mod:`services.console.pipeline`
(blocking calls, run in a thread here).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from scanwatch import kafka
from scanwatch.model_registry import Registry
from schemas.training_events import DatasetSpec
from services.auth.scopes import OPERATOR
from services.auth.web_security import event_stream
from services.auth.web_sessions import check_csrf
from services.console import audit, pipeline, training_ops
from services.console.model_status import model_status
from services.console.web import Staff, WebDep, require_role

log = logging.getLogger(__name__)
router = APIRouter(prefix="/operator")

Operator = Annotated[Staff, Depends(require_role(OPERATOR))]
#: DICOM's audit event type for what an operator does to the application (PS3.15 A.5.3).
APPLICATION_ACTIVITY = ("110100", "Application Activity")
#: How long the live stream waits for the training feed before a keep-alive (seconds).
LIVE_WAIT_S = 15.0


@dataclass
class Operations:
    """What the operator pages reach (``app.state.operations``); a part left unset (no Kafka,
    no model repository) is shown as not configured, never guessed."""

    repository: Path | None
    bootstrap_servers: str | None
    listener_health_url: str | None
    model_server: str | None  # host:port of the TF Serving gRPC API
    model_name: str
    feed: training_ops.TrainingFeed | None
    producer: kafka.EventProducer | None

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        if self.producer is not None:
            self.producer.close()


def operations(request: Request) -> Operations:
    found: Operations = request.app.state.operations
    return found


OperationsDep = Annotated[Operations, Depends(operations)]


async def _audit(web: WebDep, staff: Staff, detail: str, outcome: str = audit.SUCCESS) -> None:
    await web.record(
        audit.audit_event(staff.actor, APPLICATION_ACTIVITY, audit.EXECUTE, outcome, detail=detail)
    )


# --- Models -------------------------------------------------------------------------------------


@router.get("/models", response_class=HTMLResponse)
async def models_page(
    request: Request, web: WebDep, ops: OperationsDep, staff: Operator, fragment: bool = False
) -> Response:
    """Every model's versions, newest first: status, metrics, report; promote and roll back."""
    models: dict[str, list[training_ops.VersionView]] = {}
    if ops.repository is not None:
        names = await asyncio.to_thread(Registry(ops.repository).names)
        for name in names:
            models[name] = await asyncio.to_thread(training_ops.versions, ops.repository, name)
    return web.page(
        request,
        "operator_models_table.html" if fragment else "operator_models.html",
        staff.session,
        title="Models",
        nav="models",
        models=models,
        configured=ops.repository is not None,
        can_act=ops.producer is not None,
        changes=_changes(ops),
        answer=_answer(ops, request.query_params.get("request")),
    )


def _changes(ops: Operations) -> int:
    """The feed's count of changes a page is drawn with (its live stream starts there)."""
    return ops.feed.changes if ops.feed is not None else 0


def _answer(ops: Operations, request_id: str | None) -> dict[str, Any] | None:
    """What became of a promotion or rollback this page asked for (None: not asked)."""
    if not request_id:
        return None
    try:
        asked = uuid.UUID(request_id)
    except ValueError:
        return None
    answer = ops.feed.answer(asked) if ops.feed is not None else None
    if answer is None:
        return {"pending": True}
    return {"pending": False, **answer.model_dump(mode="json")}


@router.get("/models/{name}/{version}/report/{file_name}")
async def report_file(
    ops: OperationsDep, staff: Operator, name: str, version: int, file_name: str
) -> Response:
    """A plot or the Markdown of a version's evaluation report."""
    path = (
        await asyncio.to_thread(training_ops.report_file, ops.repository, name, version, file_name)
        if ops.repository is not None
        else None
    )
    if path is None:
        return Response("not found", status_code=404, media_type="text/plain")
    media = "image/png" if path.suffix == ".png" else "text/plain; charset=utf-8"
    return FileResponse(path, media_type=media)


@router.post("/models/{name}/{version}/{action}")
async def lifecycle(
    request: Request,
    web: WebDep,
    ops: OperationsDep,
    staff: Operator,
    name: str,
    version: int,
    action: str,
    csrf_token: Annotated[str | None, Form()] = None,
) -> Response:
    """Ask the training worker to promote ``version`` or roll back to it."""
    check_csrf(staff.session, csrf_token)
    if action not in ("promote", "rollback") or ops.producer is None:
        return Response("not found", status_code=404, media_type="text/plain")
    try:
        request_id = await asyncio.to_thread(
            training_ops.request_lifecycle,
            ops.producer,
            name,
            action,  # type: ignore[arg-type]  # checked just above
            version,
            requested_by=staff.session.account or "",
        )
    except (ValidationError, ValueError) as error:
        return web.page(
            request, "message.html", staff.session, 400, title="Not sent",
            text=f"The request was not sent: {_first_error(error)}",
        )  # fmt: skip
    except kafka.KafkaPublishError:
        return _kafka_down(request, web, staff)
    await _audit(web, staff, f"{action} {name} version {version}")
    return RedirectResponse(f"/operator/models?request={request_id}", status_code=303)


# --- Training jobs ---------------------------------------------------------------------------


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request, web: WebDep, ops: OperationsDep, staff: Operator, fragment: bool = False
) -> Response:
    """Training jobs, newest first, live; a form to start one."""
    return web.page(
        request,
        "operator_jobs_table.html" if fragment else "operator_jobs.html",
        staff.session,
        title="Training jobs",
        nav="jobs",
        jobs=ops.feed.jobs() if ops.feed is not None else [],
        configured=ops.feed is not None,
        form={},
        errors=[],
        changes=_changes(ops),
    )


@router.post("/jobs", response_class=HTMLResponse)
async def start_job(
    request: Request,
    web: WebDep,
    ops: OperationsDep,
    staff: Operator,
    model_name: Annotated[str, Form()] = "",
    dataset: Annotated[str, Form()] = "benchmark:tiny",
    folder: Annotated[str, Form()] = "",
    epochs: Annotated[str, Form()] = "",
    promote: Annotated[str | None, Form()] = None,
    csrf_token: Annotated[str | None, Form()] = None,
) -> Response:
    """Start a training job: the request goes over Kafka to the training worker."""
    check_csrf(staff.session, csrf_token)
    form = {"model_name": model_name, "dataset": dataset, "folder": folder, "epochs": epochs}
    errors: list[str] = []
    spec: DatasetSpec | None = None
    try:
        kind, _, preset = dataset.partition(":")
        spec = (
            DatasetSpec(kind="benchmark", preset=preset)
            if kind == "benchmark"
            else DatasetSpec(kind=kind, path=folder.strip() or None)
        )
    except ValidationError as error:
        errors.append(f"Dataset: {_first_error(error)}")
    count: int | None = None
    if epochs.strip():
        if not epochs.strip().isdigit() or not 1 <= int(epochs) <= 1000:
            errors.append(f"Epochs: {epochs!r} is not a whole number from 1 to 1000.")
        else:
            count = int(epochs)
    if ops.producer is None:
        errors.append("Kafka is not configured for the console: no job can be started here.")
    if not errors and spec is not None and ops.producer is not None:
        try:
            job_id = await asyncio.to_thread(
                training_ops.request_job,
                ops.producer,
                model_name.strip(),
                spec,
                epochs=count,
                promote=promote is not None,
                requested_by=staff.session.account or "",
            )
        except ValidationError as error:
            errors.append(_first_error(error))
        except kafka.KafkaPublishError:
            return _kafka_down(request, web, staff)
        else:
            await _audit(web, staff, f"training job {job_id} requested for {model_name.strip()}")
            return RedirectResponse(f"/operator/jobs/{job_id}", status_code=303)
    return web.page(
        request,
        "operator_jobs.html",
        staff.session,
        400,
        title="Training jobs",
        nav="jobs",
        jobs=ops.feed.jobs() if ops.feed is not None else [],
        configured=ops.feed is not None,
        form=form,
        errors=errors,
        changes=_changes(ops),
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(
    request: Request,
    web: WebDep,
    ops: OperationsDep,
    staff: Operator,
    job_id: str,
    fragment: bool = False,
) -> Response:
    """One job: its status, and each epoch's metrics as they come."""
    try:
        wanted = uuid.UUID(job_id)
    except ValueError:
        wanted = None
    job = ops.feed.job(wanted) if ops.feed is not None and wanted is not None else None
    return web.page(
        request,
        "operator_job_detail.html" if fragment else "operator_job.html",
        staff.session,
        title="Training job",
        nav="jobs",
        job=job,
        job_id=job_id,
        changes=_changes(ops),
    )


@router.get("/events")
async def events(
    request: Request, ops: OperationsDep, staff: Operator, since: int | None = None
) -> Response:
    """Server-sent events: ``changed`` when a job's status or a lifecycle answer arrives.
    ``since`` is the feed's count of changes the page was drawn with: one that came between
    drawing the page and opening this stream is announced at once."""
    feed = ops.feed

    async def stream() -> AsyncIterator[bytes]:
        yield b": connected\n\n"
        if feed is None:
            return
        seen = feed.changes if since is None else since
        if seen != feed.changes:
            seen = feed.changes
            yield b"event: changed\ndata: {}\n\n"
        while not await request.is_disconnected():
            now = await asyncio.to_thread(feed.wait_for_change, seen, LIVE_WAIT_S)
            if now != seen:
                seen = now
                yield b"event: changed\ndata: {}\n\n"
            else:
                yield b": idle\n\n"

    return event_stream(stream())


# --- Pipeline health ---------------------------------------------------------------------------


@router.get("/pipeline", response_class=HTMLResponse)
async def pipeline_page(
    request: Request, web: WebDep, ops: OperationsDep, staff: Operator
) -> Response:
    """The listener and its outbox, the served model's versions, consumer lag per topic,
    dead letters with their reasons."""
    listener = (
        await asyncio.to_thread(pipeline.listener_health, ops.listener_health_url)
        if ops.listener_health_url
        else None
    )
    model = (
        await asyncio.to_thread(model_status, ops.model_server, ops.model_name)
        if ops.model_server
        else None
    )
    lag: list[pipeline.Lag] = []
    letters: list[pipeline.Letter] = []
    kafka_error = None
    if ops.bootstrap_servers:
        try:
            lag = await asyncio.to_thread(pipeline.consumer_lag, ops.bootstrap_servers)
            letters = await asyncio.to_thread(pipeline.dead_letters, ops.bootstrap_servers)
        except Exception as error:  # noqa: BLE001 - Kafka down: the page says so
            log.warning("pipeline page: Kafka unavailable", extra={"error": type(error).__name__})
            kafka_error = "Kafka did not answer; the lag and dead letters cannot be read now."
    await web.record(audit.audit_event(staff.actor, audit.QUERY, audit.EXECUTE, query=["pipeline"]))
    return web.page(
        request,
        "operator_pipeline.html",
        staff.session,
        title="Pipeline health",
        nav="pipeline",
        listener=listener,
        model=model,
        lag=lag,
        letters=letters,
        kafka_configured=ops.bootstrap_servers is not None,
        kafka_error=kafka_error,
        redriven=request.query_params.get("redriven"),
    )


@router.post("/dead-letters/redrive")
async def redrive(
    request: Request,
    web: WebDep,
    ops: OperationsDep,
    staff: Operator,
    letter: Annotated[str, Form()] = "",
    csrf_token: Annotated[str | None, Form()] = None,
) -> Response:
    """Put a dead letter's original message back on its source topic."""
    check_csrf(staff.session, csrf_token)
    if ops.bootstrap_servers is None or ops.producer is None:
        return _kafka_down(request, web, staff)
    found = await asyncio.to_thread(pipeline.find_letter, ops.bootstrap_servers, letter)
    if found is None:
        return web.page(
            request, "message.html", staff.session, 404, title="No such dead letter",
            text="That dead letter was not found (it may have expired).",
        )  # fmt: skip
    try:
        await asyncio.to_thread(pipeline.redrive, ops.producer, found)
    except kafka.KafkaPublishError:
        return _kafka_down(request, web, staff)
    await _audit(web, staff, f"dead letter {found.ref} re-driven to {found.letter.source_topic}")
    return RedirectResponse(f"/operator/pipeline?redriven={found.ref}", status_code=303)


def _kafka_down(request: Request, web: WebDep, staff: Staff) -> HTMLResponse:
    return web.page(
        request, "message.html", staff.session, 503, title="Kafka unavailable",
        text="Kafka did not take the request. Nothing was sent; please try again.",
    )  # fmt: skip


def _first_error(error: ValidationError | ValueError) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(error)
