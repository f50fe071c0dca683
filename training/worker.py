"""The training worker: runs ``training.job.requested.v1`` jobs and reports their status.

One job at a time (training uses every core). For each request the worker emits
``training.job.status.v1`` events keyed by ``job_id``: ``queued`` when it takes the request,
``running`` when the version is reserved and after every epoch, then ``succeeded`` (held-out
metrics, version, whether it was promoted) or ``failed`` (the reason). The offset is committed
after the final status, so a worker killed mid-job gets the request again: the job's run folder
(``<runs_dir>/<job_id>``) and its reserved version are reused and training resumes; a job that
already finished only has its final status sent again. A request that cannot be parsed goes to
``training.job.requested.v1.dlq`` with the reason.

Beside the jobs, on a thread of its own so that an operator need not wait for a training run
to end, the worker carries out ``model.lifecycle.requested.v1``: promote a version (with the
held-out comparison of :func:`training.lifecycle.promote`) or roll back to an older one
(:func:`training.lifecycle.rollback`), and answers with ``model.lifecycle.completed.v1``. Each
request names the version to serve, so a redelivered one finds it served and only says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from scanwatch import kafka
from scanwatch.model_registry import (
    CANDIDATE,
    FAILED,
    REJECTED,
    RESERVED,
    LifecycleError,
    PromotionRefused,
    Registry,
)
from schemas.events import DeadLetterV1
from schemas.topics import dlq
from schemas.training_events import (
    ModelLifecycleCompletedV1,
    ModelLifecycleRequestedV1,
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
)
from training.config import TrainSettings
from training.events import EventPublisher
from training.lifecycle import JobOutcome, flat_metrics, load_dataset, promote, rollback, run_job

logger = logging.getLogger(__name__)

GROUP_ID = "scanwatch-training"
LIFECYCLE_GROUP_ID = "scanwatch-model-lifecycle"
POLL_TIMEOUT_S = 0.5


class JobReporter:
    """Turns a job's progress into status events."""

    def __init__(self, events: EventPublisher, request: TrainingJobRequestedV1) -> None:
        self.events, self.request = events, request
        self.version: int | None = None
        self.epochs: int | None = None

    def status(self, status: str, **fields: Any) -> None:
        event = TrainingJobStatusV1(
            job_id=self.request.job_id,
            model_name=self.request.model_name,
            status=status,
            model_version=fields.pop("model_version", self.version),
            epochs=self.epochs,
            **fields,
        )
        self.events.send(event, key=str(self.request.job_id))

    # -- training.train.Progress ------------------------------------------------------------
    def on_start(self, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self.epochs = epochs
        self.status("running", epoch=start_epoch)

    def on_batch(self, step: int) -> None:
        pass

    def on_epoch(self, epoch: int, phase: str, metrics: dict[str, float]) -> None:
        self.status("running", epoch=epoch, metrics=metrics)


#: Runs one job: (request, settings, reporter) → outcome. Replaceable in tests.
JobRunner = Callable[[TrainingJobRequestedV1, TrainSettings, JobReporter, Registry], JobOutcome]


def settings_for(request: TrainingJobRequestedV1, base: TrainSettings) -> TrainSettings:
    overrides = {
        key: value
        for key, value in (
            ("variant", request.variant),
            ("epochs", request.epochs),
            ("batch_size", request.batch_size),
            ("seed", request.seed),
        )
        if value is not None
    }
    values = {**base.model_dump(), **overrides, "model_name": request.model_name}
    return TrainSettings(**values)


def run_requested_job(
    request: TrainingJobRequestedV1,
    settings: TrainSettings,
    reporter: JobReporter,
    registry: Registry,
) -> JobOutcome:
    """The real runner: load the dataset, then :func:`training.lifecycle.run_job`."""
    run_dir = settings.runs_dir / str(request.job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    data, path = load_dataset(request.dataset, settings, run_dir)

    def reserved(version: int) -> None:
        reporter.version = version

    return run_job(
        data,
        path,
        settings,
        run_dir,
        registry=registry,
        events=reporter.events,
        progress=reporter,
        promote_if_better=request.promote,
        job_id=request.job_id,
        on_reserved=reserved,
    )


@dataclass
class TrainingWorker:
    """Consumes job requests from Kafka and runs them one by one."""

    settings: TrainSettings
    events: EventPublisher
    runner: JobRunner = run_requested_job
    group_id: str = GROUP_ID

    def handle(
        self, raw: bytes, *, topic: str, partition: int | None = None, offset: int | None = None
    ) -> None:
        """One message: parse, run, report. Never raises for a bad message or a failed job."""
        try:
            request = TrainingJobRequestedV1.from_bytes(raw)
        except ValidationError as error:
            self._dead_letter(raw, error, topic, partition, offset)
            return
        reporter = JobReporter(self.events, request)
        registry = Registry(self.settings.repository)
        earlier = registry.job_version(request.model_name, str(request.job_id))
        if earlier is not None and earlier.status not in (RESERVED, FAILED):
            # Redelivered after it finished: say again how it ended, do not train twice.
            reporter.version = earlier.version
            reporter.status(
                "succeeded",
                metrics=earlier.metrics,
                promoted=earlier.status not in (CANDIDATE, REJECTED),
                reason=earlier.note,
            )
            return
        reporter.status("queued")
        try:
            settings = settings_for(request, self.settings)
            outcome = self.runner(request, settings, reporter, registry)
        except Exception as error:  # noqa: BLE001 - a failed job is reported, the worker goes on
            logger.exception("training job failed", extra={"job_id": str(request.job_id)})
            reporter.status("failed", reason=f"{type(error).__name__}: {error}"[:2000])
            return
        reporter.status(
            "succeeded",
            model_version=outcome.version,
            metrics=flat_metrics(outcome.report),
            promoted=outcome.promoted,
            reason=outcome.reason,
        )

    def handle_lifecycle(
        self, raw: bytes, *, topic: str, partition: int | None = None, offset: int | None = None
    ) -> None:
        """One promotion or rollback request: carry it out, say how it ended. Never raises."""
        try:
            request = ModelLifecycleRequestedV1.from_bytes(raw)
        except ValidationError as error:
            self._dead_letter(raw, error, topic, partition, offset)
            return
        name, version = request.model_name, request.model_version
        registry = Registry(self.settings.repository)
        fields: dict[str, Any] = {}
        try:
            served = registry.served_versions(name)
            if served and served[-1] == version:
                # Done already (a redelivery, or a second click): nothing to do twice.
                fields = {"outcome": "done", "model_version": version}
            elif request.action == "promote":
                previous = promote(registry, name, version, self.events)
                fields = {"outcome": "done", "model_version": version, "previous_version": previous}
            else:
                withdrawn, now_served = rollback(registry, name, self.events, version)
                fields = {
                    "outcome": "done",
                    "model_version": now_served,
                    "previous_version": withdrawn,
                }
        except (PromotionRefused, LifecycleError, LookupError) as refused:
            fields = {"outcome": "refused", "reason": str(refused)[:2000]}
        except Exception as error:  # noqa: BLE001 - reported; the worker goes on
            logger.exception("model lifecycle request failed", extra={"model_name": name})
            fields = {"outcome": "failed", "reason": f"{type(error).__name__}: {error}"[:2000]}
        logger.info(
            "model lifecycle request handled",
            extra={"model_name": name, "action": request.action, "outcome": fields["outcome"]},
        )
        self.events.send(
            ModelLifecycleCompletedV1(
                request_id=request.request_id, model_name=name, action=request.action, **fields
            ),
            key=str(request.request_id),
        )

    def _dead_letter(
        self,
        raw: bytes,
        error: ValidationError,
        topic: str,
        partition: int | None,
        offset: int | None,
    ) -> None:
        logger.warning("unusable request", extra={"topic": topic, "offset": offset})
        self.events.send(
            DeadLetterV1(
                source_topic=topic,
                source_partition=partition,
                source_offset=offset,
                reason=str(error)[:2000],
                error_class="unusable",
                payload=raw.decode("utf-8", "replace"),
            ),
            key=f"{topic}:{partition}:{offset}",
            topic=dlq(topic),
        )

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set: jobs here, lifecycle requests on a second thread;
        each request's offset is committed after its final status."""
        if not self.settings.kafka_bootstrap_servers:
            raise ValueError("SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS must be set for the worker")
        lifecycle = threading.Thread(
            target=self._consume,
            args=(
                ModelLifecycleRequestedV1.SCHEMA,
                LIFECYCLE_GROUP_ID,
                self.handle_lifecycle,
                stop,
            ),
            name="model-lifecycle",
            daemon=True,
        )
        lifecycle.start()
        try:
            # A job can train for a long time between polls (librdkafka's maximum, 24 h).
            self._consume(
                TrainingJobRequestedV1.SCHEMA,
                self.group_id,
                self.handle,
                stop,
                **{"max.poll.interval.ms": 24 * 3600 * 1000},
            )
        finally:
            stop.set()
            lifecycle.join()

    def _consume(
        self,
        topic: str,
        group_id: str,
        handler: Callable[..., None],
        stop: threading.Event,
        **config: Any,
    ) -> None:
        assert self.settings.kafka_bootstrap_servers
        consumer = kafka.new_consumer(
            self.settings.kafka_bootstrap_servers, group_id, [topic], **config
        )
        logger.info("training worker consuming", extra={"topic": topic})
        try:
            while not stop.is_set():
                message = consumer.poll(POLL_TIMEOUT_S)
                if message is None:
                    continue
                if message.error() is not None:
                    logger.warning("consumer error", extra={"error": str(message.error())})
                    continue
                handler(
                    message.value() or b"",
                    topic=message.topic() or topic,
                    partition=message.partition(),
                    offset=message.offset(),
                )
                consumer.commit(message=message, asynchronous=False)
        finally:
            consumer.close()
