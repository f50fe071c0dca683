"""The operator's data: model versions with their reports, training jobs and promotion over
Kafka (answered by the real training worker), consumer lag, dead letters and their re-drive,
the listener's health. Real Kafka broker throughout."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devtools.kafka_local import LocalKafka, free_port, read_topic
from devtools.testing import wait_for
from scanwatch import kafka as kafka_adapter
from scanwatch.model_registry import EVALUATION_DIR, REPORT_JSON, Registry
from schemas.events import DeadLetterV1, ListenerWatermarkV1, StudyReadyV1
from schemas.training_events import DatasetSpec, TrainingJobRequestedV1, TrainingJobStatusV1
from services.console import pipeline, training_ops

pytestmark = pytest.mark.integration

#: Not the training tests' "brain": their workers read the same topics in the same session.
MODEL = "console-ops"


@pytest.fixture
def producer(kafka: LocalKafka) -> Iterator[kafka_adapter.EventProducer]:
    sender = kafka_adapter.EventProducer(kafka.bootstrap_servers, "console-test", timeout_s=30)
    yield sender
    sender.close()


@pytest.fixture
def feed(kafka: LocalKafka) -> Iterator[training_ops.TrainingFeed]:
    kafka_adapter.ensure_topics(kafka.bootstrap_servers)
    following = training_ops.TrainingFeed(kafka.bootstrap_servers)
    following.start()
    yield following
    following.stop()


def test_a_job_asked_for_here_is_followed_epoch_by_epoch(
    kafka: LocalKafka, producer: kafka_adapter.EventProducer, feed: training_ops.TrainingFeed
) -> None:
    job_id = training_ops.request_job(
        producer,
        MODEL,
        DatasetSpec(kind="benchmark", preset="tiny"),
        epochs=2,
        requested_by="olivia",
    )

    def asked_for(records: list) -> list[TrainingJobRequestedV1]:
        decoded = (TrainingJobRequestedV1.from_bytes(r.value) for r in records)
        return [job for job in decoded if job.job_id == job_id]

    records = read_topic(
        kafka.bootstrap_servers, TrainingJobRequestedV1.SCHEMA, lambda rs: bool(asked_for(rs))
    )
    (asked,) = asked_for(records)
    assert (asked.epochs, asked.requested_by, asked.promote) == (2, "olivia", False)

    # What the training worker answers, in order.
    for status in (
        TrainingJobStatusV1(job_id=job_id, model_name=MODEL, status="queued"),
        TrainingJobStatusV1(
            job_id=job_id,
            model_name=MODEL,
            status="running",
            epoch=1,
            epochs=2,
            model_version=3,
            metrics={"loss": 0.9},
        ),
        TrainingJobStatusV1(
            job_id=job_id,
            model_name=MODEL,
            status="running",
            epoch=2,
            epochs=2,
            metrics={"loss": 0.5},
        ),
        TrainingJobStatusV1(
            job_id=job_id,
            model_name=MODEL,
            status="succeeded",
            model_version=3,
            metrics={"macro_f1": 0.97},
            promoted=False,
            reason="left a candidate",
        ),
    ):
        producer.send_event(status, key=str(job_id))
    wait_for(lambda: (job := feed.job(job_id)) is not None and job.status == "succeeded")
    job = feed.job(job_id)
    assert job is not None
    assert [epoch for epoch, _ in job.history] == [1, 2]
    assert job.history[1][1] == {"loss": 0.5}
    assert (job.model_version, job.epochs, job.promoted) == (3, 2, False)
    assert job.metrics == {"macro_f1": 0.97}
    assert feed.jobs()[0].job_id == job_id


def test_promotion_asked_here_is_carried_out_by_the_training_worker(
    kafka: LocalKafka,
    producer: kafka_adapter.EventProducer,
    feed: training_ops.TrainingFeed,
    tmp_path: Path,
) -> None:
    # The real worker and a real SavedModel (TensorFlow: this is the test that needs it).
    from training.config import TrainSettings
    from training.events import KafkaEvents
    from training.tests.test_training_worker import candidate, failing_runner
    from training.worker import TrainingWorker

    repository = tmp_path / "models"
    registry = Registry(repository)
    first, second = candidate(registry, 0.9, MODEL), candidate(registry, 0.6, MODEL)
    events = KafkaEvents(kafka.bootstrap_servers)
    worker = TrainingWorker(
        TrainSettings(
            repository=repository,
            runs_dir=tmp_path / "runs",
            kafka_bootstrap_servers=kafka.bootstrap_servers,
        ),
        events,
        runner=failing_runner,  # job requests of other tests on the topic: no training here
        group_id=f"t-{uuid.uuid4().hex}",
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        done = training_ops.request_lifecycle(
            producer, MODEL, "promote", first, requested_by="olivia"
        )
        wait_for(lambda: feed.answer(done), timeout=120, what="the promotion")
        refused = training_ops.request_lifecycle(
            producer, MODEL, "promote", second, requested_by="olivia"
        )
        wait_for(lambda: feed.answer(refused), timeout=120, what="the refusal")
    finally:
        stop.set()
        thread.join(timeout=30)
        events.close()
    assert feed.answer(done).outcome == "done"  # type: ignore[union-attr]
    answer = feed.answer(refused)
    assert answer is not None and answer.outcome == "refused" and "below" in (answer.reason or "")
    shown = {v.record.version: v for v in training_ops.versions(repository, MODEL)}
    assert shown[first].served and not shown[second].served
    assert shown[second].record.status == "rejected"


def test_versions_show_their_report_and_plots_and_nothing_outside_it(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    registry = Registry(repository)
    run_dir = tmp_path / "runs" / "job-1"
    report_dir = run_dir / EVALUATION_DIR
    report_dir.mkdir(parents=True)
    (report_dir / REPORT_JSON).write_text(json.dumps({"macro_f1": 0.97, "per_class": {}}))
    (report_dir / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "runs" / "secret.txt").write_text("not for the browser")
    version = registry.reserve(MODEL, job_id="job-1", run_dir=str(run_dir))
    registry.mark_failed(MODEL, version, "stopped")
    other = registry.reserve(MODEL)  # no run: no report
    registry.mark_failed(MODEL, other, "stopped")

    newest, oldest = training_ops.versions(repository, MODEL)
    assert (newest.record.version, newest.report, newest.plots) == (other, None, ())
    assert oldest.report == {"macro_f1": 0.97, "per_class": {}}
    assert oldest.plots == ("roc.png",)
    assert registry.names() == [MODEL]
    assert training_ops.report_file(repository, MODEL, version, "roc.png") is not None
    for bad in ("../secret.txt", "..", ".hidden", "a/b.png", "missing.png"):
        assert training_ops.report_file(repository, MODEL, version, bad) is None
    assert training_ops.report_file(repository, MODEL, 99, "roc.png") is None


def test_consumer_lag_per_group_and_topic(
    kafka: LocalKafka, producer: kafka_adapter.EventProducer
) -> None:
    kafka_adapter.ensure_topics(kafka.bootstrap_servers)
    topic = StudyReadyV1.SCHEMA
    key = f"1.2.826.0.1.{uuid.uuid4().int % 10**12}"
    for n in range(5):
        producer.send(topic, key.encode(), f'{{"n": {n}}}'.encode())
        # A heartbeat topic's lag is no backlog: it is not reported
        producer.send(ListenerWatermarkV1.SCHEMA, key.encode(), f'{{"n": {n}}}'.encode())
    group = f"scanwatch-lag-test-{uuid.uuid4().hex[:8]}"
    consumer = kafka_adapter.new_consumer(
        kafka.bootstrap_servers, group, [topic, ListenerWatermarkV1.SCHEMA]
    )
    try:
        taken = {topic: 0, ListenerWatermarkV1.SCHEMA: 0}
        while min(taken.values()) < 2:
            message = consumer.poll(10)
            assert message is not None, "nothing to consume"
            if message.error() is None and message.key() == key.encode():
                if taken[message.topic()] < 2:  # up to its second message on each topic
                    taken[message.topic()] += 1
                    consumer.commit(message=message, asynchronous=False)
        # The group committed up to its second message of ours: everything after is lag.
        (lag,) = [g for g in pipeline.consumer_lag(kafka.bootstrap_servers) if g.group == group]
    finally:
        consumer.close()
    assert lag.topic == topic
    assert lag.newest - lag.committed == lag.lag >= 3
    assert not any(
        g.group.startswith("scanwatch-console")
        for g in pipeline.consumer_lag(kafka.bootstrap_servers)
    )


def test_dead_letters_are_listed_with_their_reason_and_re_driven_with_their_key(
    kafka: LocalKafka, producer: kafka_adapter.EventProducer
) -> None:
    kafka_adapter.ensure_topics(kafka.bootstrap_servers)
    source = StudyReadyV1.SCHEMA
    study = f"1.2.826.0.2.{uuid.uuid4().int % 10**12}"
    payload = json.dumps({"study_instance_uid": study, "marker": uuid.uuid4().hex})
    letter = DeadLetterV1(
        source_topic=source,
        source_partition=1,
        source_offset=42,
        key=study,
        reason="no usable MR series (3 instances, none axial)",
        error_class="unusable",
        payload=payload,
    )
    producer.send_event(letter, key=study, topic=f"{source}.dlq")

    listed = [f for f in pipeline.dead_letters(kafka.bootstrap_servers) if f.letter.key == study]
    assert len(listed) == 1
    found = listed[0]
    assert found.letter.reason == letter.reason and found.topic == f"{source}.dlq"
    assert pipeline.find_letter(kafka.bootstrap_servers, found.ref) == found
    for bad in ("nope", f"{source}.dlq:0:-1", "training.job.status.v1:0:0", "x:y:z"):
        assert pipeline.find_letter(kafka.bootstrap_servers, bad) is None

    pipeline.redrive(producer, found)
    back = read_topic(
        kafka.bootstrap_servers,
        source,
        lambda records: any(r.value == payload.encode() for r in records),
        timeout=60,
    )
    (again,) = [r for r in back if r.value == payload.encode()]
    assert again.key == study.encode()
    forged = pipeline.Letter(
        found.topic, 0, 0, 0.0, letter.model_copy(update={"source_topic": "x"})
    )
    with pytest.raises(ValueError, match="source topic"):
        pipeline.redrive(producer, forged)


class _Listener(BaseHTTPRequestHandler):
    """Answers as the listener's /healthz does (its document; 503 when a check fails)."""

    document: dict = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps(self.document).encode()
        self.send_response(200 if self.document.get("status") == "ok" else 503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_listeners_health_and_outbox_depth() -> None:
    _Listener.document = {
        "status": "unavailable",
        "checks": {"outbox": "ok", "publisher": "publisher not running"},
        "outbox_depth": 17,
        "kafka": "down",
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        health = pipeline.listener_health(f"http://127.0.0.1:{server.server_port}/healthz")
    finally:
        server.shutdown()
    assert (health.reachable, health.status, health.outbox_depth) == (True, "unavailable", 17)
    assert health.checks["publisher"] == "publisher not running"
    gone = pipeline.listener_health(f"http://127.0.0.1:{free_port()}/healthz", timeout=1)
    assert (gone.reachable, gone.status, gone.outbox_depth) == (False, "unreachable", None)
