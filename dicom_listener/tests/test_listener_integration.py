"""The listener with real peers: dcmtk storescu/echoscu in, a real Kafka broker out."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_listener.app import ListenerApp, create_app
from dicom_listener.config import Settings
from kafka import KafkaConsumer
from scanwatch.kafka_local import LocalKafka, free_port
from scanwatch.peers import PeerError, echoscu, storescu
from scanwatch.sample import build_mr_study
from schemas.events import InstanceReceivedV1

pytestmark = pytest.mark.integration

AE_TITLE = "SCANWATCH"


def start_listener(tmp_path: Path, **overrides: object) -> ListenerApp:
    values: dict[str, object] = {
        "ae_title": AE_TITLE,
        "host": "127.0.0.1",
        "port": 0,
        "storage_dir": tmp_path / "store",
        "metrics_port": 0,
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


def received_events(
    kafka: LocalKafka, study_uid: str, expected: int, timeout: float = 20.0
) -> list[tuple[bytes, InstanceReceivedV1]]:
    """Events of ``study_uid`` on the topic, polled until ``expected`` arrived or time is up."""
    consumer = KafkaConsumer(
        InstanceReceivedV1.SCHEMA,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    found: list[tuple[bytes, InstanceReceivedV1]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    event = InstanceReceivedV1.from_bytes(record.value)
                    if event.StudyInstanceUID == study_uid:
                        found.append((record.key, event))
    finally:
        consumer.close()
    return found


def test_storescu_series_is_stored_byte_identical_and_announced(
    listener: ListenerApp,
    kafka: LocalKafka,
    tmp_path: Path,
    dataset_bytes: Callable[[bytes], bytes],
) -> None:
    files = build_mr_study(
        tmp_path / "sent", patient_id=f"SW-IT-{uuid.uuid4().hex[:8]}", n_slices=8
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID

    storescu(files, "127.0.0.1", listener.port, called_ae=AE_TITLE, calling_ae="IT-SCANNER")

    series_dir = listener.settings.storage_dir / study_uid / series_uid
    by_sop: dict[str, Path] = {}
    for sent in files:
        sop_uid = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        stored = series_dir / f"{sop_uid}.dcm"
        assert dataset_bytes(stored.read_bytes()) == dataset_bytes(sent.read_bytes())
        by_sop[sop_uid] = stored
    assert sorted(p.name for p in series_dir.iterdir()) == sorted(p.name for p in by_sop.values())

    events = received_events(kafka, study_uid, expected=len(files))
    assert len(events) == len(files)
    assert {key for key, _ in events} == {study_uid.encode()}
    assert {event.SOPInstanceUID for _, event in events} == set(by_sop)
    for _, event in events:
        assert event.storage_uri == by_sop[event.SOPInstanceUID].resolve().as_uri()
        assert event.size_bytes == by_sop[event.SOPInstanceUID].stat().st_size
        assert (event.calling_ae_title, event.called_ae_title) == ("IT-SCANNER", AE_TITLE)

    metrics = httpx.get(f"http://127.0.0.1:{listener.settings.metrics_port}/metrics").text
    assert f"scanwatch_listener_instances_received_total {float(len(files))}" in metrics


def test_storescu_folder_is_scanned_recursively(
    listener: ListenerApp, mr_series: list[Path]
) -> None:
    storescu(mr_series[0].parent, "127.0.0.1", listener.port, called_ae=AE_TITLE)
    for sent in mr_series:
        ds = pydicom.dcmread(sent, stop_before_pixels=True)
        stored = listener.settings.storage_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
        assert (stored / f"{ds.SOPInstanceUID}.dcm").is_file()


def test_echoscu_answers_only_to_our_ae_title(listener: ListenerApp) -> None:
    assert echoscu("127.0.0.1", listener.port, called_ae=AE_TITLE)
    assert not echoscu("127.0.0.1", listener.port, called_ae="SOMEONE-ELSE")


def test_unreachable_kafka_gives_the_sender_a_failure_status(
    tmp_path: Path, mr_series: list[Path]
) -> None:
    app = start_listener(
        tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", kafka_timeout_s=1.0
    )
    try:
        with pytest.raises(PeerError, match="OutOfResources"):
            storescu(mr_series[:1], "127.0.0.1", app.port, called_ae=AE_TITLE)
        refused = app.metrics.registry.get_sample_value(
            "scanwatch_listener_instances_refused_total", {"reason": "publish_failed"}
        )
        assert refused == 1
        received = app.metrics.registry.get_sample_value(
            "scanwatch_listener_instances_received_total"
        )
        assert received == 0
    finally:
        app.stop()
