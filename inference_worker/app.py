"""Composition root of the inference worker: the Faust app, its topics, table and agents.

Only wiring: the flow itself (assembly, announcing, scoring, dead letters, parking, per-study
ordering) is :class:`inference_worker.flow.WorkerFlow`; the agents hand it each event.

Every study-keyed topic has the same partition count, so a study's instance events, its ready
event and its table keys (a header, an entry per instance and per step: study_store.py) all live
on the same partition number, owned by one worker at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Mapping, MutableMapping
from typing import Any, cast

import faust
import mode
from faust.transport.producer import ProducerBuffer
from faust.types import TP, EventT, StreamT, TopicT
from faust.types.tuples import FutureMessage
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inference_worker.adapters.fhir_writer import FhirWriter
from inference_worker.adapters.tf_serving import ModelClient, TfServingModel
from inference_worker.circuit import CircuitBreaker
from inference_worker.config import Settings
from inference_worker.errors import SignatureMismatch
from inference_worker.flow import Origin, StudyScorer, WorkerFlow
from inference_worker.metrics import WorkerMetrics
from inference_worker.pixels import PixelPool
from inference_worker.scoring import Scorer
from inference_worker.study_store import StudyStore
from scanwatch import kafka
from scanwatch.http_access import METRICS_CHALLENGE, metrics_allowed, metrics_closed_warning
from schemas import (
    InferenceResultV1,
    InstanceReceivedV1,
    ListenerWatermarkV1,
    ProcedureStepV1,
    StudyReadyV1,
    dlq,
)
from schemas.topics import LARGE_RECORD_BYTES, STUDY_PARTITIONS, TopicSpec

#: Name of the changelogged table of studies being assembled.
STUDY_TABLE = "study-assembly"


log = logging.getLogger(__name__)


def table_topics(app: faust.App) -> list[TopicSpec]:
    """The study table's changelog, as the worker creates it before Faust starts: compacted,
    co-partitioned with the study topics, replicated like scanwatch's own topics
    (:func:`scanwatch.kafka.ensure_topics`). Left to Faust, two workers starting together
    raced to create it, and one crashed on the half-created topic (PartitionsMismatch)."""
    changelog = app.tables[STUDY_TABLE].changelog_topic.get_topic_name()
    return [TopicSpec(changelog, partitions=STUDY_PARTITIONS, compact=True)]


def drain_on_flush(buffer: ProducerBuffer) -> None:
    """Make ``buffer.flush()`` return only once every message put in Faust's producer buffer
    has been handed to the Kafka client (whose own flush then waits for its acknowledgement).

    Faust commits a consumed offset after ``producer.flush()``, so that a table write (our
    study table's changelog) made while handling an event is on Kafka before the event counts
    as done. But its buffer's flush gives up after 0.1 s without progress and returns with
    messages still queued: while a changelog partition's leader is down, the offsets of events
    were committed without their table writes. A worker killed then, or a rebalance whose new
    owner restored the changelog before those writes arrived, lost the instances from the
    study for good (the broker-leader test's failure: a study scored on 9 of its 10 instances
    and never again). Here a flush waits, as long as the buffer's service runs, for the queue
    to empty and the send in progress to finish.
    """
    sending = 0
    send = buffer._send_pending

    async def counted_send(fut: FutureMessage) -> None:
        nonlocal sending
        sending += 1
        try:
            await send(fut)
        finally:
            sending -= 1

    async def flush() -> None:
        while buffer.size or sending:
            if buffer.state != "running":  # stopping: what Faust's own flush raises
                raise RuntimeError("Cannot flush: Producer not Running")
            buffer.message_sent.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(buffer.message_sent.wait(), timeout=1.0)

    # Set before the app starts: the buffer's task reads ``_send_pending`` once, at its start.
    buffer._send_pending = counted_send  # type: ignore[method-assign]
    buffer.flush = flush  # type: ignore[method-assign]


def rewind_uncommitted(consumer: Any, topics: Collection[str]) -> None:
    """Make Faust's "seek to committed offsets" start a partition that has no committed offset
    of ``topics`` (the agents' streams: the changelog's position is recovery's) from its
    beginning, as ``auto_offset_reset="earliest"`` says, instead of leaving it where the
    fetcher happened to be.

    After a rebalance, Faust restores the tables and then seeks every stream partition to its
    committed offset, which also undoes whatever was fetched meanwhile: records fetched for a
    partition that recovery paused before they were handed on are dropped, the fetch position
    already past them. A partition with no committed offset is not sought at all (aiokafka
    seeks only to an offset above 0), so those records were never read. That lost instances
    in the broker-leader test: worker 2 joined while the first studies streamed in, the killed
    leader was the group coordinator, so worker 1 never committed the partition it handed
    over, and worker 2 read it from offset 10, past three instances of a study whose other
    seven worker 1 had assembled (the study was scored on those seven, and never again).
    """
    seek_to_committed = consumer.seek_to_committed

    async def seek_committed_or_beginning() -> Mapping[TP, int]:
        committed: Mapping[TP, int] = await seek_to_committed()
        fresh = [tp for tp, offset in committed.items() if not offset and tp.topic in topics]
        if fresh:
            log.info(
                "uncommitted partitions read from their beginning",
                extra={"partitions": [f"{tp.topic}-{tp.partition}" for tp in fresh]},
            )
            await consumer._thread.seek_to_beginning(*fresh)
        return committed

    consumer.seek_to_committed = seek_committed_or_beginning


def _broker_url(servers: str) -> str:
    return ";".join(f"kafka://{s.strip()}" for s in servers.split(",") if s.strip())


def default_scorer(settings: Settings, metrics: WorkerMetrics) -> Scorer:
    """The production scorer: the TF Serving gRPC API and the FHIR API named in ``settings``."""
    breaker = CircuitBreaker(
        settings.breaker_failures, settings.breaker_reset_s, on_state=metrics.circuit_state.set
    )
    client = ModelClient(
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
        TfServingModel(client),
        FhirWriter(
            settings.fhir_base_url,
            client_id=settings.fhir_client_id,
            client_secret=settings.fhir_client_secret,
            token_url=settings.fhir_token_url,
        ),
        retries=settings.retries,
        metrics=metrics,
        rules=settings.selection_rules(),
        heatmaps=settings.heatmaps,
        pixels=PixelPool(settings.decode_processes),
    )


def _origin(event: EventT[Any]) -> Origin:
    message = event.message
    raw = message.headers or ()
    headers = tuple(raw.items() if isinstance(raw, Mapping) else raw)
    # Faust gives the record's timestamp in seconds; a record without one has a negative one
    stamp = message.timestamp if message.timestamp and message.timestamp > 0 else None
    return Origin(message.topic, message.partition, message.offset, message.key, headers, stamp)


def create_app(
    settings: Settings, scorer: StudyScorer | None = None, metrics: WorkerMetrics | None = None
) -> faust.App:
    """Build the worker. ``scorer`` is injectable for tests; by default it talks to the model
    server and the FHIR API named in ``settings``. Nothing connects until the app starts."""
    app = faust.App(
        settings.app_id,
        broker=_broker_url(settings.kafka_bootstrap_servers),
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=STUDY_PARTITIONS,
        topic_replication_factor=settings.topic_replication_factor,
        producer_acks=-1,
        # A ready event lists its study's instances: a large study's passes Kafka's 1 MB.
        producer_max_request_size=LARGE_RECORD_BYTES,
        consumer_max_fetch_size=LARGE_RECORD_BYTES,
        consumer_auto_offset_reset="earliest",
        web_host=settings.web_host,
        web_port=settings.web_port,
        # Faust's own pages would show the study table's keys (StudyInstanceUIDs) and who owns
        # them, to anyone who can reach the port: only /healthz and /metrics are served.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        # An agent that raises must take the whole worker down (its supervisor restarts it and
        # the uncommitted message is redelivered), not leave a half-running worker behind.
        agent_supervisor=mode.CrashingSupervisor,
    )
    drain_on_flush(cast(ProducerBuffer, app.producer.buffer))
    metrics_closed_warning(
        settings.web_host, settings.metrics_secret, "SCANWATCH_WORKER_METRICS_TOKEN"
    )
    if metrics is None:
        metrics = scorer.metrics if isinstance(scorer, Scorer) else WorkerMetrics()
    scorer = scorer or default_scorer(settings, metrics)
    if isinstance(scorer, Scorer):
        pixels = scorer.pixels

        def close_pixel_pool(sender: Any, **kwargs: Any) -> None:
            """The pool's processes stop with the worker (after its consumer stops)."""
            pixels.close()

        app.on_before_shutdown.connect(close_pixel_pool)  # type: ignore[arg-type]

    def raw_topic(name: str) -> TopicT:
        return app.topic(name, key_serializer="raw", value_serializer="raw")

    instances_topic = raw_topic(InstanceReceivedV1.SCHEMA)
    steps_topic = raw_topic(ProcedureStepV1.SCHEMA)
    watermarks_topic = raw_topic(ListenerWatermarkV1.SCHEMA)
    ready_topic = raw_topic(StudyReadyV1.SCHEMA)
    rewind_uncommitted(
        app.consumer, {t.get_topic_name() for t in (instances_topic, steps_topic, ready_topic)}
    )
    results_topic = raw_topic(InferenceResultV1.SCHEMA)
    table = app.Table(
        STUDY_TABLE,
        partitions=STUDY_PARTITIONS,
        key_type=bytes,  # raw StudyInstanceUID bytes; Faust derives the changelog codec from it
    )
    # A study is a header and an entry per instance and step (study_store.py): one whole
    # value per study sent the study again on every instance (a 1 MB record at ~1 770).
    studies = StudyStore(cast(MutableMapping[bytes, Any], table))

    @table.on_recover
    async def reload_studies() -> None:
        """After a rebalance, the table holds what its changelog restored: read it again."""
        studies.reload()
        if log.isEnabledFor(logging.DEBUG):  # a pass over the whole table: on demand only
            owned = [(key, state) for key, state in studies.items() if owns(key)]
            due = [(k, state) for k, state in owned if len(state["instances"]) > state["announced"]]
            log.debug("study table restored", extra={"studies": len(owned), "due": len(due)})
            for key, state in due:
                counts = {"instances": len(state["instances"]), "announced": state["announced"]}
                log.debug("due study restored", extra={"StudyInstanceUID": key.decode(), **counts})

    def owns(key: bytes) -> bool:
        """Whether this worker actively owns (not as a standby) the partition of ``key``."""
        topic = instances_topic.get_topic_name()
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
        # The partitioner contract: the listener's producer put the study's events there.
        return kafka.partition_for(key, STUDY_PARTITIONS) in owned

    async def end_offset(partition: int) -> int | None:
        """An instance-topic partition's end offset, asked of the broker now."""
        tp = TP(instances_topic.get_topic_name(), partition)
        try:
            return (await app.consumer.highwaters(tp))[tp]
        except Exception as exc:  # noqa: BLE001 - not answered: the study waits for the next pass
            log.warning(
                "end offset not answered", extra={"partition": partition, "error": str(exc)}
            )
            return None

    flow = WorkerFlow(
        settings,
        scorer,
        studies,
        ready_topic,
        results_topic,
        lambda topic: raw_topic(dlq(topic)),
        owns,
        metrics,
        end_offset=end_offset,
    )

    def instance_partitions(tps: Any) -> set[int]:
        topic = instances_topic.get_topic_name()
        return {tp.partition for tp in tps if tp.topic == topic}

    def revoked(sender: Any, *partitions: Any, signal: Any, **kwargs: Any) -> None:
        flow.partitions_revoked(instance_partitions(partitions[0]))

    def assigned(sender: Any, *partitions: Any, signal: Any, **kwargs: Any) -> None:
        flow.partitions_assigned(instance_partitions(partitions[0]))

    # mode types a receiver as a generic callable no plain function matches under mypy.
    app.on_partitions_revoked.connect(revoked)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(assigned)  # type: ignore[arg-type]

    @app.task
    async def check_model_on_start() -> None:
        try:
            await flow.check_model()
        except SignatureMismatch as exc:
            await app.crash(exc)

    @app.agent(instances_topic, name="assemble")
    async def assemble(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            await flow.assemble(event.value, _origin(event))

    @app.agent(steps_topic, name="procedure-steps")
    async def procedure_steps(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            await flow.procedure_step(event.value, _origin(event))

    @app.agent(watermarks_topic, name="listener-watermarks")
    async def listener_watermarks(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            await flow.watermark(event.value, _origin(event))

    @app.timer(interval=settings.check_interval_s)
    async def release_ready_studies() -> None:
        await flow.release_ready_studies()

    # Each actor holds one ready study; scoring slots go to the oldest (flow.ArrivalGate).
    in_flight = max(settings.studies_in_flight, settings.scoring_concurrency)

    @app.agent(ready_topic, name="score", concurrency=in_flight)
    async def score(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            await flow.score(event.value, _origin(event))

    @app.page("/healthz")
    async def healthz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json({"status": "ok", "model_image_size": scorer.model.image_size})

    @app.page("/metrics")
    async def prometheus(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        authorization = request.headers.get("Authorization")
        if not metrics_allowed(authorization, settings.metrics_secret, settings.web_host):
            return web.json(
                {"status": 401, "error": "/metrics needs the metrics bearer token"},
                status=401,
                headers={"WWW-Authenticate": METRICS_CHALLENGE},
            )
        return web.bytes(
            generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    return app
