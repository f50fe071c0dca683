"""The listener as a supervisor runs it, with its worker and publisher processes: kill -9 in
the middle of a transfer (every instance storescu saw succeed is on disk after a restart, and
its event reaches Kafka), workers sharing the port, the publisher told when associations end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.kafka_local import LocalKafka, free_port
from devtools.peers import dcmtk_env, echoscu, storescu
from dicom_listener.tests.helpers import received_events, sop_uid, wait_for
from scanwatch.sample import build_mr_study

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Successful C-STOREs to see before the listener is killed.
KILL_AFTER = 6


def service_env(tmp_path: Path, port: int, kafka: LocalKafka, **settings: object) -> dict[str, str]:
    """The environment of a listener service storing under ``tmp_path``; ``settings`` by
    field name (``workers=2``)."""
    values: dict[str, object] = {
        "port": port,
        "storage_dir": tmp_path / "store",
        "metrics_port": 0,
        "min_free_disk_bytes": 0,
        "kafka_bootstrap_servers": kafka.bootstrap_servers,
    }
    return {
        **os.environ,
        **{f"SCANWATCH_LISTENER_{k.upper()}": str(v) for k, v in (values | settings).items()},
    }


def spawn_listener(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_listener"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wait_for(
        lambda: proc.poll() is not None or echoscu("127.0.0.1", port, "SCANWATCH", timeout=1),
        30,
        "the listener to answer C-ECHO",
    )
    assert proc.poll() is None, "listener exited"
    return proc


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(
    kafka: LocalKafka, tmp_path: Path, dataset_bytes: Callable[[bytes], bytes]
) -> None:
    files = build_mr_study(
        tmp_path / "sent", patient_id=f"SW-K9-{uuid.uuid4().hex[:8]}", n_slices=38
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID
    port = free_port()
    env = service_env(tmp_path, port, kafka)
    listener = spawn_listener(env, port)
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "SCANWATCH", "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    acknowledged: list[Path] = []
    current: Path | None = None
    try:
        assert sender.stdout is not None
        for line in sender.stdout:
            if "Sending file: " in line:
                current = Path(line.split("Sending file: ", 1)[1].strip())
            elif "Received Store Response (Success)" in line and current is not None:
                acknowledged.append(current)
                if len(acknowledged) == KILL_AFTER:
                    listener.send_signal(signal.SIGKILL)
                    listener.wait()
        sender.wait(timeout=30)
    finally:
        for proc in (sender, listener):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sender.returncode != 0, "storescu should have seen the listener die"
    assert KILL_AFTER <= len(acknowledged) < len(files)

    restarted = spawn_listener(env, port)
    try:
        folder = tmp_path / "store" / study_uid / series_uid
        for sent in acknowledged:
            stored = folder / f"{sop_uid(sent)}.dcm"
            assert dataset_bytes(stored.read_bytes()) == dataset_bytes(sent.read_bytes())
        assert not list(folder.glob(".*.tmp")), "temporary files are swept at start"
        events = received_events(kafka.bootstrap_servers, {study_uid}, expected=len(acknowledged))
        assert {sop_uid(f) for f in acknowledged} <= {e.SOPInstanceUID for _, e, _ in events}
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=30)


def parse_prometheus(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition, by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_worker_processes_share_the_port_and_one_outbox(kafka: LocalKafka, tmp_path: Path) -> None:
    studies = [
        build_mr_study(tmp_path / f"s{n}", patient_id=f"SW-WK-{uuid.uuid4().hex[:8]}", n_slices=6)
        for n in range(4)
    ]
    port, publisher_metrics = free_port(), free_port()
    env = service_env(tmp_path, port, kafka, workers=2, publisher_metrics_port=publisher_metrics)
    listener = spawn_listener(env, port)
    try:
        senders = [
            subprocess.Popen(
                ["storescu", "-aec", "SCANWATCH", "127.0.0.1", str(port), *map(str, files)],
                env=dcmtk_env(),
            )
            for files in studies
        ]
        assert [s.wait(timeout=60) for s in senders] == [0] * len(studies)
        uids = {pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID for f in studies}
        events = received_events(kafka.bootstrap_servers, uids, expected=6 * len(studies))
        assert len(events) == 6 * len(studies)
        # The publisher process exports its own metrics: Kafka publish latency among them.
        published = parse_prometheus(
            httpx.get(f"http://127.0.0.1:{publisher_metrics}/metrics", timeout=5).text
        )
        assert published["scanwatch_listener_events_published_total"] >= 6 * len(studies)
        assert published["scanwatch_listener_publish_seconds_count"] >= 1
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=30)
    assert listener.returncode == 0


def test_the_publisher_process_sends_a_study_as_soon_as_its_association_ends(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    """The publisher process looks for new events only once a minute here; the end of each
    association signals it, so each study's events reach Kafka within seconds."""
    port = free_port()
    env = service_env(tmp_path, port, kafka, publish_poll_s=60)
    listener = spawn_listener(env, port)
    try:
        # The first study may also be found by the publisher's first look at the outbox; once
        # it is on Kafka, the publisher waits for a signal or its next poll, a minute away.
        for n in range(2):
            files = build_mr_study(
                tmp_path / f"s{n}", patient_id=f"SW-FL-{uuid.uuid4().hex[:8]}", n_slices=3
            )
            storescu(files, "127.0.0.1", port, called_ae="SCANWATCH")
            study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            events = received_events(kafka.bootstrap_servers, {study_uid}, expected=3, timeout=20)
            assert [e.SOPInstanceUID for _, e, _ in events] == [sop_uid(f) for f in files]
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=30)
