"""The training worker: status events per job, failures reported, versions never shared."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import keras
import pytest

from scanwatch.model_registry import Registry
from schemas.events import DeadLetterV1
from schemas.training_events import (
    DatasetSpec,
    ModelLifecycleCompletedV1,
    ModelLifecycleRequestedV1,
    ModelPublishedV1,
    TrainingJobRequestedV1,
    TrainingJobStatusV1,
)
from training.config import TrainSettings
from training.events import KafkaEvents, MemoryEvents
from training.export import export_saved_model
from training.lifecycle import JobOutcome
from training.worker import JobReporter, TrainingWorker

# Every test exports a real SavedModel (TensorFlow); the last one also runs a Kafka broker.
pytestmark = pytest.mark.integration

CLASSES = ["normal", "mass"]


def fake_runner(
    request: TrainingJobRequestedV1,
    settings: TrainSettings,
    reporter: JobReporter,
    registry: Registry,
) -> JobOutcome:
    """What the real runner does to the repository, without training: reserve, 2 epochs, export."""
    version = registry.reserve(settings.model_name, job_id=str(request.job_id))
    reporter.version = version
    reporter.on_start(0, 2, 10)
    for epoch in (1, 2):
        reporter.on_epoch(epoch, "initial", {"loss": 1.0 / epoch, "val_macro_f1": 0.5})
    export_candidate(registry, settings.model_name, version, 0.8)
    report = {
        "macro_f1": 0.8,
        "weighted_avg": {"f1-score": 0.8},
        "accuracy": 0.8,
        "roc_auc": {"macro": 0.9},
        "per_class": {c: {"f1-score": 0.8} for c in CLASSES},
    }
    return JobOutcome(
        settings.model_name,
        version,
        report,
        False,
        None,
        None,
        settings.runs_dir / str(request.job_id),
    )


def export_candidate(registry: Registry, name: str, version: int, macro_f1: float) -> None:
    """A real SavedModel in staging, registered as a candidate with ``macro_f1``."""
    inputs = keras.Input((32, 32, 3), name="images")
    model = keras.Model(
        inputs,
        keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)),
    )
    export_saved_model(model, CLASSES, 0.5, registry.repository / ".staging", name, version=version)
    registry.record_candidate(
        name,
        version,
        dataset_fingerprint="b" * 64,
        metrics={"macro_f1": macro_f1},
        class_names=CLASSES,
        threshold=0.5,
    )


def candidate(registry: Registry, macro_f1: float, name: str = "brain") -> int:
    version = registry.reserve(name)
    export_candidate(registry, name, version, macro_f1)
    return version


def failing_runner(*args: object) -> JobOutcome:
    raise RuntimeError("dataset folder is empty")


def request(**fields: object) -> TrainingJobRequestedV1:
    return TrainingJobRequestedV1(
        model_name="brain", dataset=DatasetSpec(kind="benchmark", preset="tiny"), **fields
    )


def settings(tmp_path: Path, **fields: object) -> TrainSettings:
    return TrainSettings(repository=tmp_path / "models", runs_dir=tmp_path / "runs", **fields)


def statuses(events: MemoryEvents) -> list[TrainingJobStatusV1]:
    return [e for _, _, e in events.sent if isinstance(e, TrainingJobStatusV1)]


def test_a_job_reports_queued_running_and_succeeded(tmp_path: Path) -> None:
    events = MemoryEvents()
    job = request()
    TrainingWorker(settings(tmp_path), events, runner=fake_runner).handle(
        job.to_bytes(), topic=job.SCHEMA
    )
    seen = statuses(events)
    assert [s.status for s in seen] == ["queued", "running", "running", "running", "succeeded"]
    assert [s.epoch for s in seen[1:4]] == [0, 1, 2]
    assert seen[2].metrics["loss"] == 1.0 and seen[2].epochs == 2
    assert seen[-1].model_version == 1 and seen[-1].metrics["macro_f1"] == 0.8
    assert seen[-1].promoted is False
    assert all(s.job_id == job.job_id for s in seen)
    assert {key for _, key, _ in events.sent} == {str(job.job_id)}


def test_a_failed_job_says_why(tmp_path: Path) -> None:
    events = MemoryEvents()
    job = request()
    TrainingWorker(settings(tmp_path), events, runner=failing_runner).handle(
        job.to_bytes(), topic=job.SCHEMA
    )
    *_, last = statuses(events)
    assert last.status == "failed" and "dataset folder is empty" in (last.reason or "")


def test_a_redelivered_finished_job_is_not_trained_again(tmp_path: Path) -> None:
    events = MemoryEvents()
    worker = TrainingWorker(settings(tmp_path), events, runner=fake_runner)
    job = request()
    worker.handle(job.to_bytes(), topic=job.SCHEMA)
    worker.runner = failing_runner  # would fail if it ran again
    events.sent.clear()
    worker.handle(job.to_bytes(), topic=job.SCHEMA)
    [only] = statuses(events)
    assert only.status == "succeeded" and only.model_version == 1


def test_an_unusable_request_goes_to_the_dead_letter_topic(tmp_path: Path) -> None:
    events = MemoryEvents()
    TrainingWorker(settings(tmp_path), events, runner=fake_runner).handle(
        b'{"model_name": "brain"}', topic=TrainingJobRequestedV1.SCHEMA, partition=0, offset=7
    )
    [(topic, _, event)] = events.sent
    assert topic == "training.job.requested.v1.dlq"
    assert isinstance(event, DeadLetterV1) and event.source_offset == 7
    assert "dataset" in event.reason


def test_request_overrides_reach_the_settings(tmp_path: Path) -> None:
    from training.worker import settings_for

    job = request(epochs=3, variant="b2", seed=9)
    chosen = settings_for(job, settings(tmp_path))
    assert (chosen.epochs, chosen.variant, chosen.seed, chosen.model_name) == (3, "B2", 9, "brain")


def test_two_jobs_over_kafka_get_two_versions(kafka, tmp_path: Path) -> None:
    from devtools.kafka_local import read_topic
    from scanwatch import kafka as kafka_adapter

    group = f"test-{uuid.uuid4().hex}"
    base = settings(tmp_path, kafka_bootstrap_servers=kafka.bootstrap_servers)
    events = KafkaEvents(kafka.bootstrap_servers)
    worker = TrainingWorker(base, events, runner=fake_runner, group_id=group)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    jobs = [request(), request()]
    producer = kafka_adapter.EventProducer(kafka.bootstrap_servers, "test", timeout_s=30)
    for job in jobs:
        producer.send_event(job, key=str(job.job_id))
    producer.close()

    wanted = {job.job_id for job in jobs}

    def statuses(records) -> list[TrainingJobStatusV1]:
        return [
            s
            for s in map(TrainingJobStatusV1.from_bytes, (r.value for r in records))
            if s.job_id in wanted
        ]

    def finished(records) -> bool:
        return {
            s.job_id for s in statuses(records) if s.status in ("succeeded", "failed")
        } == wanted

    try:
        records = read_topic(kafka.bootstrap_servers, TrainingJobStatusV1.SCHEMA, finished, 120)
    finally:
        stop.set()
        thread.join(timeout=30)
        events.close()
    seen: dict[uuid.UUID, list[str]] = {job_id: [] for job_id in wanted}
    final: dict[uuid.UUID, TrainingJobStatusV1] = {}
    for status in statuses(records):
        seen[status.job_id].append(status.status)
        if status.status in ("succeeded", "failed"):
            final[status.job_id] = status
    assert set(final) == wanted, seen
    assert all(s.status == "succeeded" for s in final.values())
    assert sorted(s.model_version for s in final.values()) == [1, 2]
    assert all(steps[0] == "queued" and "running" in steps for steps in seen.values())
    assert sorted(v.version for v in Registry(base.repository).versions("brain")) == [1, 2]


def lifecycle(worker: TrainingWorker, action: str, version: int) -> ModelLifecycleCompletedV1:
    """Hand the worker one request as Kafka would; return the answer it sent."""
    events = worker.events
    assert isinstance(events, MemoryEvents)
    request = ModelLifecycleRequestedV1(
        model_name="brain", action=action, model_version=version, requested_by="olivia"
    )
    worker.handle_lifecycle(request.to_bytes(), topic=request.SCHEMA, partition=0, offset=7)
    answers = [e for _, _, e in events.sent if isinstance(e, ModelLifecycleCompletedV1)]
    assert answers and answers[-1].request_id == request.request_id
    return answers[-1]


def published(events: MemoryEvents) -> list[ModelPublishedV1]:
    return [e for _, _, e in events.sent if isinstance(e, ModelPublishedV1)]


def test_an_operator_promotes_and_rolls_back_through_the_worker(tmp_path: Path) -> None:
    events = MemoryEvents()
    worker = TrainingWorker(settings(tmp_path), events)
    registry = Registry(tmp_path / "models")
    first, second = candidate(registry, 0.9), candidate(registry, 0.95)

    done = lifecycle(worker, "promote", first)
    assert (done.outcome, done.model_version, done.previous_version) == ("done", first, None)
    done = lifecycle(worker, "promote", second)
    assert (done.outcome, done.model_version, done.previous_version) == ("done", second, first)
    assert registry.served_versions("brain")[-1] == second

    back = lifecycle(worker, "rollback", first)
    assert (back.outcome, back.model_version, back.previous_version) == ("done", first, second)
    assert registry.served_versions("brain") == [first]
    assert [(p.action, p.model_version) for p in published(events)] == [
        ("promoted", first),
        ("promoted", second),
        ("rolled-back", first),
    ]


def test_a_worse_candidate_is_refused_with_the_reason(tmp_path: Path) -> None:
    events = MemoryEvents()
    worker = TrainingWorker(settings(tmp_path), events)
    registry = Registry(tmp_path / "models")
    served, worse = candidate(registry, 0.9), candidate(registry, 0.6)
    lifecycle(worker, "promote", served)

    refused = lifecycle(worker, "promote", worse)
    assert refused.outcome == "refused"
    assert refused.reason and "below" in refused.reason and "0.6000" in refused.reason
    assert registry.served_versions("brain") == [served]
    unknown = lifecycle(worker, "promote", 99)
    assert unknown.outcome == "refused" and "99" in (unknown.reason or "")
    newer = lifecycle(worker, "rollback", served + 5)
    assert newer.outcome == "refused" and "not older" in (newer.reason or "")


def test_a_redelivered_request_does_nothing_twice(tmp_path: Path) -> None:
    events = MemoryEvents()
    worker = TrainingWorker(settings(tmp_path), events)
    registry = Registry(tmp_path / "models")
    first, second = candidate(registry, 0.9), candidate(registry, 0.9)
    lifecycle(worker, "promote", first)
    lifecycle(worker, "promote", second)
    lifecycle(worker, "rollback", first)
    before = len(published(events))

    again = lifecycle(worker, "rollback", first)
    assert (again.outcome, again.model_version) == ("done", first)
    assert len(published(events)) == before  # nothing announced, nothing moved
    assert registry.served_versions("brain") == [first]


def test_an_unusable_lifecycle_request_goes_to_the_dead_letter_topic(tmp_path: Path) -> None:
    events = MemoryEvents()
    worker = TrainingWorker(settings(tmp_path), events)
    raw = b'{"model_name": "brain", "action": "promote"}'  # no version
    worker.handle_lifecycle(raw, topic=ModelLifecycleRequestedV1.SCHEMA, partition=0, offset=3)
    (topic, _, letter), *_ = events.sent
    assert topic == ModelLifecycleRequestedV1.SCHEMA + ".dlq"
    assert isinstance(letter, DeadLetterV1) and "model_version" in letter.reason


def test_a_promotion_over_kafka_while_the_worker_runs(kafka, tmp_path: Path) -> None:
    from devtools.kafka_local import read_topic
    from scanwatch import kafka as kafka_adapter

    base = settings(tmp_path, kafka_bootstrap_servers=kafka.bootstrap_servers)
    version = candidate(Registry(base.repository), 0.9)
    events = KafkaEvents(kafka.bootstrap_servers)
    worker = TrainingWorker(base, events, runner=fake_runner, group_id=f"t-{uuid.uuid4().hex}")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    ask = ModelLifecycleRequestedV1(model_name="brain", action="promote", model_version=version)
    producer = kafka_adapter.EventProducer(kafka.bootstrap_servers, "test", timeout_s=30)
    producer.send_event(ask, key=str(ask.request_id))
    producer.close()

    def answers(records) -> list[ModelLifecycleCompletedV1]:
        decoded = map(ModelLifecycleCompletedV1.from_bytes, (r.value for r in records))
        return [a for a in decoded if a.request_id == ask.request_id]

    try:
        records = read_topic(
            kafka.bootstrap_servers,
            ModelLifecycleCompletedV1.SCHEMA,
            lambda r: bool(answers(r)),
            120,
        )
    finally:
        stop.set()
        thread.join(timeout=30)
        events.close()
    (answer,) = answers(records)
    assert (answer.outcome, answer.model_version) == ("done", version)
    assert Registry(base.repository).served_versions("brain") == [version]
