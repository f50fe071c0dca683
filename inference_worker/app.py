"""Composition root of the inference worker: the Faust app, its topics, table and agents.

Flow (DESIGN §2)::

    dicom.instance.received.v1 --assemble--> table "study-assembly"
        timer: quiet period over --> dicom.study.ready.v1 --score--> FHIR + inference.result.v1

Every study-keyed topic has the same partition count, so a study's instance events, its ready
event and its table entry all live on the same partition number, owned by one worker at a time.

Errors are classified (STYLE habit 7): an unusable message or study goes to ``<topic>.dlq`` with
the reason; a transient failure (model server or FHIR API down) is retried with backoff and then
parked in the table, to be announced again later; anything else crashes the worker, so that its
supervisor restarts it and the uncommitted message is redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import mode
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from inference_worker.adapters.fhir_writer import FhirWriter
from inference_worker.assembly import (
    add_instance,
    is_ready,
    mark_announced,
    park,
    ready_event,
)
from inference_worker.circuit import CircuitBreaker
from inference_worker.config import Settings
from inference_worker.metrics import WorkerMetrics
from inference_worker.model_client import ModelClient, SignatureMismatch
from inference_worker.retry import is_transient
from inference_worker.scoring import Scorer
from inference_worker.series import UnusableStudy
from schemas import (
    DeadLetterV1,
    InferenceResultV1,
    InstanceReceivedV1,
    StudyReadyV1,
    dlq,
)
from schemas.topics import STUDY_PARTITIONS

log = logging.getLogger(__name__)


def _broker_url(servers: str) -> str:
    return ";".join(f"kafka://{s.strip()}" for s in servers.split(",") if s.strip())


def default_scorer(settings: Settings, metrics: WorkerMetrics) -> Scorer:
    """The production scorer: the TF Serving gRPC API and the FHIR API named in ``settings``."""
    breaker = CircuitBreaker(
        settings.breaker_failures, settings.breaker_reset_s, on_state=metrics.circuit_state.set
    )
    model = ModelClient(
        settings.model_server,
        settings.model_name,
        settings.model_version,
        timeout_s=settings.predict_timeout_s,
        batch_size=settings.batch_size,
        max_message_bytes=settings.max_message_bytes,
        model_label=settings.model_label,
        breaker=breaker,
        on_batch=metrics.batch_size.observe,
    )
    return Scorer(
        model,
        FhirWriter(
            settings.fhir_base_url,
            client_id=settings.fhir_client_id,
            client_secret=settings.fhir_client_secret,
            token_url=settings.fhir_token_url,
        ),
        max_slices=settings.max_slices,
        retries=settings.retries,
        metrics=metrics,
        rules=settings.selection_rules(),
    )


def create_app(
    settings: Settings, scorer: Scorer | None = None, metrics: WorkerMetrics | None = None
) -> faust.App:
    """Build the worker. ``scorer`` is injectable for tests; by default it talks to the model
    server and the FHIR API named in ``settings``. Nothing connects until the app starts."""
    app = faust.App(
        settings.app_id,
        broker=_broker_url(settings.kafka_bootstrap_servers),
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=STUDY_PARTITIONS,
        topic_replication_factor=1,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        web_host=settings.web_host,
        web_port=settings.web_port,
        # An agent that raises must take the whole worker down (its supervisor restarts it and
        # the uncommitted message is redelivered), not leave a half-running worker behind.
        agent_supervisor=mode.CrashingSupervisor,
    )
    metrics = metrics or (scorer.metrics if scorer is not None else WorkerMetrics())
    scorer = scorer or default_scorer(settings, metrics)

    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    instances_topic = app.topic(InstanceReceivedV1.SCHEMA, **raw)
    ready_topic = app.topic(StudyReadyV1.SCHEMA, **raw)
    results_topic = app.topic(InferenceResultV1.SCHEMA, **raw)
    studies = app.Table(
        "study-assembly",
        partitions=STUDY_PARTITIONS,
        key_type=bytes,  # raw StudyInstanceUID bytes; Faust derives the changelog codec from it
    )
    partitioner = DefaultPartitioner()
    all_partitions = list(range(STUDY_PARTITIONS))
    # Ready events sent but not yet seen back by ``score`` (which records them in the table):
    # stops the timer from announcing the same study twice meanwhile. Lost on restart, which
    # only means a study may be announced again — scoring is idempotent.
    announcing: dict[bytes, int] = {}

    def owned_partitions() -> set[int]:
        """Partitions of the study-keyed topics this worker actively owns (not standby copies)."""
        topic = instances_topic.get_topic_name()
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}

    async def dead_letter(event: faust.EventT, reason: str, error_class: str) -> None:
        message = event.message
        metrics.dead_letters.labels(message.topic, error_class).inc()
        log.error(
            "dead-lettered",
            extra={"topic": message.topic, "offset": message.offset, "reason": reason},
        )
        letter = DeadLetterV1(
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            key=message.key.decode(errors="replace") if message.key else None,
            reason=reason,
            error_class=error_class,
            payload=(event.value or b"").decode(errors="replace"),
        )
        await app.topic(dlq(message.topic), **raw).send(key=message.key, value=letter.to_bytes())

    @app.task
    async def check_model_on_start() -> None:
        """Refuse to run against a model whose signature breaks the contract."""
        try:
            await scorer.model.check_signature()
        except SignatureMismatch as exc:
            log.critical("served model breaks the signature contract", extra={"error": str(exc)})
            await app.crash(exc)
        except Exception as exc:  # noqa: BLE001 - not reachable yet: checked again when scoring
            log.warning("model server not checked at start", extra={"error": str(exc)})

    @app.agent(instances_topic)
    async def assemble(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                received = InstanceReceivedV1.from_bytes(event.value)
            except ValidationError as exc:
                await dead_letter(event, f"invalid {InstanceReceivedV1.SCHEMA}: {exc}", "unusable")
                continue
            key = received.StudyInstanceUID.encode()
            studies[key] = add_instance(studies.get(key), received, time.time())

    @app.timer(interval=settings.check_interval_s)
    async def release_ready_studies() -> None:
        now = time.time()
        owned = owned_partitions()
        for key, state in list(studies.items()):
            if state is None:
                continue
            quiet = settings.quiet_period_for(state.get("source"))
            if not is_ready(state, now, quiet, settings.max_wait_s):
                continue
            if partitioner(key, all_partitions, all_partitions) not in owned:
                continue
            count = len(state["instances"])
            if announcing.get(key, 0) >= count:
                continue
            ready = ready_event(key.decode(), state, quiet)
            await ready_topic.send(key=key, value=ready.to_bytes())
            announcing[key] = count
            log.info("study ready", extra={"StudyInstanceUID": key.decode(), "instances": count})

    # With several scoring actors, two ready events of one study must not be scored at once: a
    # slower, older one could overwrite the newer result. A FIFO lock per study keeps them in
    # the order they were taken from the stream.
    study_locks: dict[bytes, asyncio.Lock] = {}
    lock_users: dict[bytes, int] = {}

    @app.agent(ready_topic, concurrency=settings.scoring_concurrency)
    async def score(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                ready = StudyReadyV1.from_bytes(event.value)
            except ValidationError as exc:
                await dead_letter(event, f"invalid {StudyReadyV1.SCHEMA}: {exc}", "unusable")
                continue
            key = ready.StudyInstanceUID.encode()
            lock = study_locks.setdefault(key, asyncio.Lock())
            lock_users[key] = lock_users.get(key, 0) + 1
            try:
                async with lock:
                    await score_one(event, ready, key)
            finally:
                lock_users[key] -= 1
                if not lock_users[key]:  # nobody else holds or waits for it
                    del lock_users[key], study_locks[key]

    async def score_one(event: faust.EventT, ready: StudyReadyV1, key: bytes) -> None:
        now = time.time()
        state = studies.get(key)
        if state is not None and state["announced"] > len(ready.instances):
            # A newer ready event of this study (more instances) was scored already.
            log.info("superseded ready event skipped", extra={"StudyInstanceUID": key.decode()})
            return
        if state is not None:
            studies[key] = mark_announced(state, len(ready.instances))
            metrics.stage_seconds.labels("assembly_wait").observe(now - state["first_received_at"])
        announcing.pop(key, None)
        try:
            result = await scorer.score(ready)
        except UnusableStudy as exc:
            await dead_letter(event, str(exc), "unusable")
            return
        except SignatureMismatch:
            log.critical("served model breaks the signature contract; stopping")
            raise
        except Exception as exc:
            if not is_transient(exc) or (state := studies.get(key)) is None:
                raise
            # Retries exhausted on a transient failure: park the study; the timer announces it
            # again when the parking time is over. Never dropped.
            studies[key] = park(state, time.time() + settings.park_s)
            metrics.parked.inc()
            log.warning(
                "study parked",
                extra={
                    "StudyInstanceUID": ready.StudyInstanceUID,
                    "retry_in_s": settings.park_s,
                    "error": str(exc),
                },
            )
            return
        await results_topic.send(key=key, value=result.to_bytes())

    @app.page("/healthz")
    async def healthz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json({"status": "ok", "model_image_size": scorer.model.image_size})

    @app.page("/metrics")
    async def prometheus(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(
            generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    return app
