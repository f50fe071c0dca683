"""A large study through a real worker process and a real broker: the study table's changelog,
read back from Kafka, holds no record near Kafka's 1 MB limit, and the study is announced once
with every instance, in a ready event larger than that limit (the ready topic takes
``schemas.topics.LARGE_RECORD_BYTES``).

Cheap on purpose: instance events only (no DICOM files, no model server, no FHIR API). The
ready event is then scored against files that do not exist, which dead-letters it
(``UnusableStudy``) after the flow has recorded it as announced: nothing announces it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.kafka_local import LocalKafka, Record, free_port, read_topic
from devtools.testing import wait_for
from inference_worker.app import STUDY_TABLE
from inference_worker.study_store import INSTANCE, StudyStore
from scanwatch import kafka as kafka_adapter
from schemas import InstanceReceivedV1, ProcedureStepV1, StudyReadyV1, dlq
from schemas.topics import STUDY_PARTITIONS

pytestmark = pytest.mark.integration

#: Enough for a ready event past Kafka's default 1 MB (~0.45 KB per instance with these UIDs).
INSTANCES = 4000
#: Each record of the table: an instance's entry or a study's header (~0.5 KB with these
#: UIDs). The whole state written per instance reached ~0.6 MB at 2 000 instances, and 1 MB,
#: Kafka's default limit, at ~1 400-2 800 instances depending on the UIDs' lengths.
RECORD_BOUND = 2048
QUIET_S = 1.0


def start_group_at_end(bootstrap: str, group: str, topics: list[str]) -> None:
    """Commit ``group``'s offsets at the end of ``topics``: the worker then reads only what
    this test sends, not what other tests of the session left on the shared broker."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})

    def end_of(topic: str, partition: int) -> list[int]:
        try:  # a broker just started may not know its partitions' leaders yet
            return [consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)[1]]
        except KafkaException:
            return []

    try:
        ends = []
        for topic in topics:
            for partition in range(STUDY_PARTITIONS):
                [high] = wait_for(lambda t=topic, p=partition: end_of(t, p), 60, f"{topic}'s end")
                ends.append(TopicPartition(topic, partition, high))
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()


@pytest.fixture
def worker(kafka: LocalKafka, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``python -m inference_worker`` as deployed, its own app id (so its own consumer group
    and changelog topic); yields the app id and its log file."""
    app_id = f"changelog-test-{uuid.uuid4().hex[:8]}"
    start_group_at_end(
        kafka.bootstrap_servers,
        app_id,
        [InstanceReceivedV1.SCHEMA, ProcedureStepV1.SCHEMA, StudyReadyV1.SCHEMA],
    )
    web = free_port()
    env = {
        **os.environ,
        "SCANWATCH_WORKER_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SCANWATCH_WORKER_APP_ID": app_id,
        "SCANWATCH_WORKER_DATA_DIR": str(tmp_path / "worker"),
        "SCANWATCH_WORKER_WEB_PORT": str(web),
        "SCANWATCH_WORKER_QUIET_PERIOD_S": str(QUIET_S),
        "SCANWATCH_WORKER_CHECK_INTERVAL_S": "0.5",
        "SCANWATCH_WORKER_PARK_S": "3600",  # a scoring failure would not announce it again
        "SCANWATCH_WORKER_MODEL_SERVER": f"127.0.0.1:{free_port()}",  # nobody: not asked
        "SCANWATCH_WORKER_DECODE_PROCESSES": "0",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "inference_worker"], env=env, stdout=out, stderr=out
        )
    try:

        def healthy() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{web}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        # generous: the worker imports TensorFlow (through the TF Serving protos), 90 s at load 12
        wait_for(healthy, timeout=300, what="the worker's /healthz")
        yield app_id, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def instance_events(study: str) -> list[InstanceReceivedV1]:
    series = f"{study}.1"
    return [
        InstanceReceivedV1(
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            SOPInstanceUID=f"{series}.{n}",
            SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
            TransferSyntaxUID="1.2.840.10008.1.2.1",
            Modality="MR",
            storage_uri=f"file:///nonexistent/{n}.dcm",  # never read: see the module
            size_bytes=1,
            sha256=f"{n:064x}",
            calling_ae_title="MR1",
            called_ae_title="SCANWATCH",
        )
        for n in range(1, INSTANCES + 1)
    ]


def test_a_4000_instance_study_keeps_every_changelog_record_small(
    kafka: LocalKafka, worker: tuple[str, Path], record_property
):
    app_id, log = worker
    study = f"2.25.{uuid.uuid4().int}"
    key = study.encode()
    events = instance_events(study)
    producer = kafka_adapter.new_producer(kafka.bootstrap_servers, "changelog-test", 30)
    for event in events:
        producer.produce(InstanceReceivedV1.SCHEMA, key=key, value=event.to_bytes())
        producer.poll(0)
    assert producer.flush(30) == 0

    def announced(records: list[Record]) -> bool:
        return any(r.key == key for r in records)

    ready = read_topic(kafka.bootstrap_servers, StudyReadyV1.SCHEMA, announced, 240, 3 * QUIET_S)
    records = [r for r in ready if r.key == key]
    assert len(records) == 1, log.read_text()[-3000:]  # once, not again after the quiet period
    assert len(records[0].value) > 1024 * 1024  # past Kafka's default limit
    mine = [StudyReadyV1.from_bytes(records[0].value)]
    assert {ref.SOPInstanceUID for ref in mine[0].instances} == {e.SOPInstanceUID for e in events}

    # The scoring agent records the announcement in the header before it scores (which
    # dead-letters this study: its files do not exist): the last record of the study.
    changelog = f"{app_id}-{STUDY_TABLE}-changelog"

    def header_announced(records: list[Record]) -> bool:
        """Whether the record just read is the header marked announced (looking at the last
        one only: asked after each record, a pass over all of them made the read quadratic,
        and 8 000 records outlasted its timeout)."""
        last = records[-1] if records else None
        return (
            last is not None
            and last.key == key
            and json.loads(last.value).get("announced") == INSTANCES
        )

    records = read_topic(kafka.bootstrap_servers, changelog, header_announced, 120)
    letters = read_topic(
        kafka.bootstrap_servers,
        dlq(StudyReadyV1.SCHEMA),
        lambda rs: any(r.key == key for r in rs),
        60,
    )
    assert any(r.key == key for r in letters)  # scored once, as expected, unusable
    study_records = [r for r in records if r.key is not None and r.key.startswith(key)]
    sizes = [len(r.key or b"") + len(r.value) for r in study_records]
    record_property("changelog_records", len(sizes))
    record_property("changelog_bytes", sum(sizes))
    record_property("largest_changelog_record", max(sizes))
    assert max(sizes) < RECORD_BOUND, max(sizes)
    entries = {r.key for r in study_records if r.key != key}
    assert entries == {key + INSTANCE + e.SOPInstanceUID.encode() for e in events}
    assert sum(sizes) < INSTANCES * RECORD_BOUND  # linear, not ~n²/2 instances
    # Written from the study's own events: one partition, the one its events are on.
    assert {r.partition for r in study_records} == {
        kafka_adapter.partition_for(key, STUDY_PARTITIONS)
    }
    # And a worker restoring the table from this changelog reads the study back whole.
    table = {r.key: json.loads(r.value) for r in records if r.key is not None and r.value}
    state = StudyStore(table)[key]
    assert len(state["instances"]) == INSTANCES and state["announced"] == INSTANCES
