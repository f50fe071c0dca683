"""Composition root of the inference worker: the Faust app, its topics, table and agents.

Flow (DESIGN §2)::

    dicom.instance.received.v1 --assemble--> table "study-assembly"
        timer: quiet period over --> dicom.study.ready.v1 --score--> FHIR + inference.result.v1

Every study-keyed topic has the same partition count, so a study's instance events, its ready
event and its table entry all live on the same partition number.
"""

from __future__ import annotations

import logging
import time

import faust
import mode
from pydantic import ValidationError

from inference_worker.adapters.fhir_writer import FhirWriter
from inference_worker.assembly import add_instance, is_ready, mark_announced, ready_event
from inference_worker.config import Settings
from inference_worker.model_client import ModelClient, SignatureMismatch
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


def create_app(settings: Settings, scorer: Scorer | None = None) -> faust.App:
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
    if scorer is None:
        scorer = Scorer(
            ModelClient(
                settings.model_server,
                settings.model_name,
                settings.model_version,
                timeout_s=settings.predict_timeout_s,
                batch_size=settings.batch_size,
                max_message_bytes=settings.max_message_bytes,
            ),
            FhirWriter(settings.fhir_base_url),
            max_slices=settings.max_slices,
            retries=settings.retries,
        )

    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    instances_topic = app.topic(InstanceReceivedV1.SCHEMA, **raw)
    ready_topic = app.topic(StudyReadyV1.SCHEMA, **raw)
    results_topic = app.topic(InferenceResultV1.SCHEMA, **raw)
    studies = app.Table(
        "study-assembly",
        partitions=STUDY_PARTITIONS,
        schema=faust.Schema(key_serializer="raw", value_serializer="json"),
    )
    # Ready events sent but not yet seen back by ``score`` (which records them in the table):
    # stops the timer from announcing the same study twice meanwhile. Lost on restart, which
    # only means a study may be announced again — scoring is idempotent.
    announcing: dict[bytes, int] = {}

    async def dead_letter(event: faust.EventT, reason: str, error_class: str) -> None:
        message = event.message
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
    async def release_quiet_studies() -> None:
        now = time.time()
        for key, state in list(studies.items()):
            if state is None or not is_ready(state, now, settings.quiet_period_s):
                continue
            count = len(state["instances"])
            if announcing.get(key, 0) >= count:
                continue
            ready = ready_event(key.decode(), state, settings.quiet_period_s)
            await ready_topic.send(key=key, value=ready.to_bytes())
            announcing[key] = count
            log.info("study ready", extra={"StudyInstanceUID": key.decode(), "instances": count})

    @app.agent(ready_topic, concurrency=1)
    async def score(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                ready = StudyReadyV1.from_bytes(event.value)
            except ValidationError as exc:
                await dead_letter(event, f"invalid {StudyReadyV1.SCHEMA}: {exc}", "unusable")
                continue
            key = ready.StudyInstanceUID.encode()
            if (state := studies.get(key)) is not None:
                studies[key] = mark_announced(state, len(ready.instances))
            announcing.pop(key, None)
            try:
                result = await scorer.score(ready)
            except UnusableStudy as exc:
                await dead_letter(event, str(exc), "unusable")
                continue
            except SignatureMismatch:
                log.critical("served model breaks the signature contract; stopping")
                raise
            await results_topic.send(key=key, value=result.to_bytes())

    @app.page("/healthz")
    async def healthz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json({"status": "ok", "model_image_size": scorer.model.image_size})

    return app
