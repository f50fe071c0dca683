"""The operator's model pages, on the training package's own records and events.

- **Versions**: read from the model registry (:mod:`scanwatch.model_registry`, the SQLite file
  beside the model repository): status, dataset fingerprint, held-out metrics, and the
  evaluation report of the run that made it (JSON, Markdown and PNG plots).
- **Training jobs**: asked for with ``training.job.requested.v1`` and followed with
  ``training.job.status.v1`` (queued, running with each epoch, succeeded or failed), which the
  training worker sends.
- **Promotion and rollback**: asked for with ``model.lifecycle.requested.v1``; the training
  worker, which holds the held-out data the promotion rule compares on, carries them out and
  answers with ``model.lifecycle.completed.v1``.

The console runs none of training's code (no TensorFlow here): it reads what training wrote and
sends what the training worker reads. :class:`TrainingFeed` follows the two answer topics from
their start on a thread of its own (assigned partitions, no consumer group: it commits nothing
and shows up in no lag table).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanwatch import kafka
from scanwatch.model_registry import REPORT_JSON, SERVING, ModelVersion, Registry
from schemas.training_events import (
    DatasetSpec,
    LifecycleAction,
    ModelLifecycleCompletedV1,
    ModelLifecycleRequestedV1,
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
)

log = logging.getLogger(__name__)

POLL_S = 0.5


# --- Versions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionView:
    """One registered version and its evaluation report, as the models page shows it."""

    record: ModelVersion
    report: dict[str, Any] | None
    plots: tuple[str, ...]  # PNG file names in the report folder

    @property
    def served(self) -> bool:
        return self.record.status == SERVING


def versions(repository: Path, name: str) -> list[VersionView]:
    """Every version of ``name``, newest first, with its report when its run left one."""
    found = []
    for record in reversed(Registry(repository).versions(name)):
        report: dict[str, Any] | None = None
        plots: tuple[str, ...] = ()
        folder = record.report_dir
        if folder is not None:
            try:
                report = json.loads((folder / REPORT_JSON).read_text())
            except (OSError, ValueError):
                report = None
            plots = tuple(sorted(p.name for p in folder.glob("*.png")))
        found.append(VersionView(record, report, plots))
    return found


def report_file(repository: Path, name: str, version: int, file_name: str) -> Path | None:
    """A file of a version's report folder by its plain name (a plot, the Markdown), or None:
    never a path outside that folder."""
    if "/" in file_name or "\\" in file_name or file_name.startswith("."):
        return None
    try:
        folder = Registry(repository).get(name, version).report_dir
    except LookupError:
        return None
    if folder is None:
        return None
    path = folder / file_name
    return path if path.is_file() else None


# --- Requests ---------------------------------------------------------------------------------


def request_job(
    producer: kafka.EventProducer,
    model_name: str,
    dataset: DatasetSpec,
    *,
    epochs: int | None = None,
    variant: str | None = None,
    promote: bool = False,
    requested_by: str,
) -> uuid.UUID:
    """Ask the training worker for a run; return its job id. Raises
    ``pydantic.ValidationError`` for a bad field (its message names the field)."""
    job = TrainingJobRequestedV1(
        model_name=model_name,
        dataset=dataset,
        epochs=epochs,
        variant=variant,
        promote=promote,
        requested_by=requested_by,
    )
    producer.send_event(job, key=str(job.job_id))
    return job.job_id


def request_lifecycle(
    producer: kafka.EventProducer,
    model_name: str,
    action: LifecycleAction,
    version: int,
    *,
    requested_by: str,
) -> uuid.UUID:
    """Ask the training worker to promote ``version`` or roll back to it; return the request id."""
    request = ModelLifecycleRequestedV1(
        model_name=model_name, action=action, model_version=version, requested_by=requested_by
    )
    producer.send_event(request, key=str(request.request_id))
    return request.request_id


# --- Following the answers ------------------------------------------------------------------------


@dataclass
class JobView:
    """A training job as its status events told it: the latest status and every epoch."""

    job_id: uuid.UUID
    model_name: str
    status: str
    model_version: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    promoted: bool | None = None
    reason: str | None = None
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (epoch, metrics)
    updated: float = 0.0  # the last event's timestamp (seconds)

    @property
    def metric_names(self) -> list[str]:
        """Every metric an epoch reported, in the order they first came."""
        return list(dict.fromkeys(name for _, metrics in self.history for name in metrics))

    def apply(self, event: TrainingJobStatusV1, timestamp: float) -> None:
        self.status, self.updated = event.status, timestamp
        for name in ("model_version", "epoch", "epochs", "promoted", "reason"):
            value = getattr(event, name)
            if value is not None:
                setattr(self, name, value)
        if event.metrics:
            self.metrics = dict(event.metrics)
        if event.status == "running" and event.epoch and event.metrics:
            self.history = [h for h in self.history if h[0] != event.epoch]
            self.history.append((event.epoch, dict(event.metrics)))


class TrainingFeed:
    """Keeps every job's state and every lifecycle answer, read from Kafka on a thread.

    ``changes`` counts what was applied: a page's live stream waits for it to move
    (:meth:`wait_for_change`)."""

    TOPICS = (TrainingJobStatusV1.SCHEMA, ModelLifecycleCompletedV1.SCHEMA)

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._jobs: dict[uuid.UUID, JobView] = {}
        self._answers: dict[uuid.UUID, ModelLifecycleCompletedV1] = {}
        self._changed = threading.Condition()
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ----------------------------------------------------------------------------

    def jobs(self) -> list[JobView]:
        """Newest first."""
        with self._changed:
            return sorted(self._jobs.values(), key=lambda j: j.updated, reverse=True)

    def job(self, job_id: uuid.UUID) -> JobView | None:
        with self._changed:
            return self._jobs.get(job_id)

    def answer(self, request_id: uuid.UUID) -> ModelLifecycleCompletedV1 | None:
        with self._changed:
            return self._answers.get(request_id)

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until ``changes`` differs from ``seen`` or ``timeout`` passes; return it."""
        with self._changed:
            self._changed.wait_for(lambda: self.changes != seen, timeout)
            return self.changes

    def apply(self, topic: str, value: bytes, timestamp: float) -> None:
        """One record of either topic (what the thread calls; tests may too)."""
        try:
            if topic == TrainingJobStatusV1.SCHEMA:
                status = TrainingJobStatusV1.from_bytes(value)
                with self._changed:
                    job = self._jobs.setdefault(
                        status.job_id, JobView(status.job_id, status.model_name, status.status)
                    )
                    job.apply(status, timestamp)
            else:
                answer = ModelLifecycleCompletedV1.from_bytes(value)
                with self._changed:
                    self._answers[answer.request_id] = answer
        except ValueError:  # pydantic's ValidationError: a record the console cannot read
            log.warning("unreadable training event", extra={"topic": topic})
            return
        with self._changed:
            self.changes += 1
            self._changed.notify_all()

    # -- the thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="training-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._read(self.apply)
            except Exception:  # noqa: BLE001 - Kafka away: the pages say so; try again
                log.warning("training feed: Kafka unavailable", exc_info=True)
                self._stop.wait(5)

    def _read(self, apply: Callable[[str, bytes, float], None]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": "scanwatch-console-feed",  # never joined: partitions are assigned
                "enable.auto.commit": False,
                "topic.metadata.refresh.interval.ms": 10_000,
            },
            logger=log,
        )
        try:
            metadata = consumer.list_topics(timeout=10)
            consumer.assign(
                [
                    TopicPartition(topic, partition, OFFSET_BEGINNING)
                    for topic in self.TOPICS
                    if topic in metadata.topics
                    for partition in metadata.topics[topic].partitions
                ]
            )
            while not self._stop.is_set():
                message = consumer.poll(POLL_S)
                if message is None or message.error() is not None:
                    continue
                _, millis = message.timestamp()
                apply(message.topic() or "", message.value() or b"", millis / 1000)
        finally:
            consumer.close()
