"""The listener with real peers: dcmtk storescu/echoscu in, a real Kafka broker out."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from aiokafka.partitioner import murmur2

from devtools.kafka_local import LocalKafka, free_port, partition_count, read_topic
from devtools.peers import echoscu, storescu
from dicom_listener.app import ListenerApp, create_app
from dicom_listener.config import Settings
from dicom_listener.handlers import HEADER_INSTANCE_VERSION
from dicom_listener.tests.helpers import TcpGate, received_events, sop_uid, wait_for
from scanwatch import kafka as kafka_client
from scanwatch.sample import build_mr_study
from schemas.events import InstanceReceivedV1, ListenerWatermarkV1
from schemas.topics import STUDY_PARTITIONS

pytestmark = pytest.mark.integration

AE_TITLE = "SCANWATCH"


def start_listener(tmp_path: Path, **overrides: object) -> ListenerApp:
    values: dict[str, object] = {
        "ae_title": AE_TITLE,
        "host": "127.0.0.1",
        "port": 0,
        "storage_dir": tmp_path / "store",
        "metrics_port": 0,
        "min_free_disk_bytes": 0,
    }
    settings = Settings(**(values | overrides))  # type: ignore[arg-type]
    app = create_app(settings)
    app.start()
    return app


@pytest.fixture(scope="module")
def listener(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListenerApp]:
    app = start_listener(
        tmp_path_factory.mktemp("listener"),
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        metrics_port=free_port(),
    )
    yield app
    app.stop()


def new_study(tmp_path: Path, n_slices: int = 8) -> tuple[list[Path], str, str]:
    files = build_mr_study(
        tmp_path / "sent", patient_id=f"SW-IT-{uuid.uuid4().hex[:8]}", n_slices=n_slices
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, first.StudyInstanceUID, first.SeriesInstanceUID


def test_storescu_series_is_stored_byte_identical_and_announced(
    listener: ListenerApp,
    kafka: LocalKafka,
    tmp_path: Path,
    dataset_bytes: Callable[[bytes], bytes],
) -> None:
    files, study_uid, series_uid = new_study(tmp_path)

    storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE, calling_ae="IT-SCANNER")

    series_dir = listener.settings.storage_dir / study_uid / series_uid
    by_sop: dict[str, Path] = {}
    for sent in files:
        stored = series_dir / f"{sop_uid(sent)}.dcm"
        assert dataset_bytes(stored.read_bytes()) == dataset_bytes(sent.read_bytes())
        by_sop[sop_uid(sent)] = stored
    assert sorted(p.name for p in series_dir.iterdir()) == sorted(p.name for p in by_sop.values())

    events = received_events(kafka.bootstrap_servers, {study_uid}, expected=len(files))
    assert len(events) == len(files)
    assert {key for key, _, _ in events} == {study_uid.encode()}
    # In order per study: the events follow the order storescu sent the files in.
    assert [event.SOPInstanceUID for _, event, _ in events] == [sop_uid(f) for f in files]
    for _, event, _ in events:
        assert event.storage_uri == by_sop[event.SOPInstanceUID].resolve().as_uri()
        assert event.size_bytes == by_sop[event.SOPInstanceUID].stat().st_size
        assert (event.calling_ae_title, event.called_ae_title) == ("IT-SCANNER", AE_TITLE)

    base = f"http://127.0.0.1:{listener.http_port}"
    metrics = httpx.get(f"{base}/metrics").text
    assert "scanwatch_listener_outbox_depth" in metrics
    assert "scanwatch_listener_event_delivery_seconds_count" in metrics
    wait_for(lambda: listener.context.outbox.depth() == 0, 10, "outbox drained")
    health = httpx.get(f"{base}/healthz")
    assert health.status_code == 200 and health.json()["kafka"] == "ok"


def _open_outbox_files(app: ListenerApp) -> int:
    """Descriptors of this process open on the outbox database, its WAL or shared memory."""
    outbox = str(app.settings.resolved_outbox_path)
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return sum(t.startswith(outbox) and not t.endswith(".lock") for t in targets)


def test_associations_leave_no_outbox_connection_open(
    listener: ListenerApp, tmp_path: Path
) -> None:
    """Each association runs on a thread of its own, with its own outbox connection: ended
    associations must not leave theirs open (the soak bench saw the listener's descriptors grow
    by about three per study)."""
    files, _, _ = new_study(tmp_path, n_slices=1)
    storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE, calling_ae="IT-SCANNER")
    before = _open_outbox_files(listener)
    for _ in range(6):
        storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE, calling_ae="IT-SCANNER")
    assert _open_outbox_files(listener) <= before


def test_a_study_goes_to_the_partition_the_java_clients_choose(
    listener: ListenerApp, kafka: LocalKafka, tmp_path: Path
) -> None:
    """The producer hashes keys as the Java clients and aiokafka (under Faust) do (murmur2), so
    every producer of the topic puts a study on the same partition."""
    keys = []
    for n in range(3):  # three studies: another hash matches all three 1 time in 64
        files, study_uid, _ = new_study(tmp_path / str(n), n_slices=2)
        storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE)
        keys.append(study_uid.encode())
    records = read_topic(
        kafka.bootstrap_servers,
        InstanceReceivedV1.SCHEMA,
        until=lambda read: sum(r.key in keys for r in read) >= 2 * len(keys),
    )
    partitions = {key: {r.partition for r in records if r.key == key} for key in keys}
    every = list(range(partition_count(kafka.bootstrap_servers, InstanceReceivedV1.SCHEMA)))
    assert len(every) > 1  # otherwise any hash would do
    # The Java client's rule: Utils.toPositive(murmur2(key)) % number of partitions.
    assert partitions == {key: {every[(murmur2(key) & 0x7FFFFFFF) % len(every)]} for key in keys}


def test_resent_study_gives_no_second_event_and_a_changed_instance_a_flagged_one(
    listener: ListenerApp, kafka: LocalKafka, tmp_path: Path
) -> None:
    files, study_uid, _ = new_study(tmp_path, n_slices=3)
    storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE)
    storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE)  # harmless duplicate send
    changed = pydicom.dcmread(files[0])
    changed.SeriesDescription = "T1 AX (corrected)"
    changed.save_as(files[0])
    storescu(files[:1], "127.0.0.1", listener.port, called_ae=AE_TITLE)

    events = received_events(kafka.bootstrap_servers, {study_uid}, expected=4)
    assert len(events) == 4, [e.SOPInstanceUID for _, e, _ in events]
    *originals, (_, version2, headers) = events
    assert all(HEADER_INSTANCE_VERSION not in h for _, _, h in originals)
    assert version2.SOPInstanceUID == sop_uid(files[0])
    assert headers[HEADER_INSTANCE_VERSION] == b"2"
    assert version2.storage_uri.endswith(".v2.dcm")


def test_watermarks_on_every_partition_follow_an_acknowledged_instance(
    listener: ListenerApp, kafka: LocalKafka, tmp_path: Path
) -> None:
    """After a C-STORE, each partition of dicom.listener.watermark.v1 gets a watermark of this
    listener that covers the instance's event (committed before its C-STORE was answered) and
    was sent after Kafka acknowledged that event (its record's timestamp)."""
    files, study_uid, _ = new_study(tmp_path, n_slices=1)
    storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE)
    answered = time.time()
    listener_id = listener.settings.resolved_listener_id
    assert partition_count(kafka.bootstrap_servers, ListenerWatermarkV1.SCHEMA) == STUDY_PARTITIONS

    consumer = kafka_client.new_consumer(
        kafka.bootstrap_servers,
        f"read-{uuid.uuid4().hex}",
        [InstanceReceivedV1.SCHEMA, ListenerWatermarkV1.SCHEMA],
    )
    event_timestamps: list[float] = []
    covering: dict[int, tuple[bytes | None, ListenerWatermarkV1]] = {}

    def read_both() -> bool:
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            value = message.value() or b""
            if message.topic() == InstanceReceivedV1.SCHEMA:
                if InstanceReceivedV1.from_bytes(value).StudyInstanceUID == study_uid:
                    event_timestamps.append(message.timestamp()[1] / 1000)
            else:
                mark = ListenerWatermarkV1.from_bytes(value)
                covers = mark.published_through.timestamp() >= answered
                if mark.listener_id == listener_id and covers:
                    covering.setdefault(message.partition() or 0, (message.key(), mark))
        return bool(event_timestamps) and len(covering) == STUDY_PARTITIONS

    try:
        wait_for(read_both, 30, "the event and a covering watermark on every partition", 0)
    finally:
        consumer.close()
    assert sorted(covering) == list(range(STUDY_PARTITIONS))
    for key, mark in covering.values():
        assert key == listener_id.encode() and not mark.closing
        assert mark.occurred_at.timestamp() >= max(event_timestamps)


def test_folder_is_scanned_recursively(listener: ListenerApp, tmp_path: Path) -> None:
    files, study_uid, series_uid = new_study(tmp_path, n_slices=2)
    storescu(files[0].parent, "127.0.0.1", listener.port, called_ae=AE_TITLE)
    for sent in files:
        stored = listener.settings.storage_dir / study_uid / series_uid
        assert (stored / f"{sop_uid(sent)}.dcm").is_file()


def test_echoscu_answers_only_to_our_ae_title(listener: ListenerApp) -> None:
    assert echoscu("127.0.0.1", listener.port, called_ae=AE_TITLE)
    assert not echoscu("127.0.0.1", listener.port, called_ae="SOMEONE-ELSE")
    rejected = listener.metrics.registry.get_sample_value(
        "scanwatch_listener_associations_rejected_total", {"reason": "called_ae_not_recognized"}
    )
    assert rejected == 1


def test_kafka_unreachable_stores_succeed_and_events_follow_when_it_returns(
    kafka: LocalKafka, tmp_path: Path, dataset_bytes: Callable[[bytes], bytes]
) -> None:
    gate = TcpGate(free_port(), ("127.0.0.1", kafka.port))  # closed: nothing listens there
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=f"127.0.0.1:{gate.port}",
        kafka_timeout_s=1.0,
        publish_retry_max_s=0.5,
    )
    try:
        files, study_uid, series_uid = new_study(tmp_path, n_slices=5)
        storescu(files, "127.0.0.1", app.port, called_ae=AE_TITLE)  # raises unless all succeed

        folder = app.settings.storage_dir / study_uid / series_uid
        for sent in files:
            stored = (folder / f"{sop_uid(sent)}.dcm").read_bytes()
            assert dataset_bytes(stored) == dataset_bytes(sent.read_bytes())
        assert app.context.outbox.depth() == len(files)
        wait_for(lambda: app.relay.last_error is not None, 10, "the relay to notice Kafka down")
        assert app.health.run()[0], "Kafka down must not make the listener unhealthy"

        gate.open()
        events = received_events(kafka.bootstrap_servers, {study_uid}, expected=len(files))
        assert [e.SOPInstanceUID for _, e, _ in events] == [sop_uid(f) for f in files]
        wait_for(lambda: app.context.outbox.depth() == 0, 10, "outbox drained")
    finally:
        app.stop()
        gate.close()
