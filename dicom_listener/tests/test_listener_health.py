"""Back-pressure and health against dcmtk: Out of Resources below the disk watermark,
recovery when space returns, /healthz failing when the listener cannot store; and 8
concurrent senders."""

from __future__ import annotations

import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest

from devtools.kafka_local import LocalKafka, free_port
from devtools.peers import PeerError, storescu
from devtools.testing import wait_for
from dicom_listener.tests.helpers import received_events, sop_uid
from dicom_listener.tests.test_listener_integration import AE_TITLE, start_listener
from scanwatch.sample import build_mr_study

pytestmark = pytest.mark.integration

#: Concurrent storescu associations in the concurrency test.
SENDERS = 8


def healthz(port: int | None) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)


def test_disk_watermark_refuses_then_recovers_on_its_own(
    kafka: LocalKafka, tmp_path: Path, mr_series: list[Path]
) -> None:
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        min_free_disk_bytes=2**60,  # more than any disk has: below the watermark
        metrics_port=free_port(),
    )
    try:
        with pytest.raises(PeerError, match="OutOfResources"):
            storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE)
        rsp = healthz(app.http_port)
        assert rsp.status_code == 503 and rsp.json()["checks"]["disk_free"] == "below watermark"

        app.context.admission.min_free_bytes = 1  # space came back

        def stored() -> bool:
            try:
                storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE)
            except PeerError:
                return False
            return True

        wait_for(stored, 5, "the listener to accept again (admission is re-checked)")
        assert healthz(app.http_port).status_code == 200
    finally:
        app.stop()


def test_healthz_fails_when_the_store_cannot_be_written(
    kafka: LocalKafka, tmp_path: Path, mr_series: list[Path]
) -> None:
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        outbox_path=tmp_path / "outbox.sqlite3",
        metrics_port=free_port(),
    )
    try:
        assert healthz(app.http_port).status_code == 200
        shutil.rmtree(app.settings.storage_dir)
        app.settings.storage_dir.write_bytes(b"")  # a file where the store should be
        rsp = healthz(app.http_port)
        assert rsp.status_code == 503
        assert rsp.json()["checks"]["storage_writable"] != "ok"
        with pytest.raises(PeerError, match="OutOfResources"):
            storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE)
    finally:
        app.stop()


def test_eight_concurrent_senders_all_succeed_in_order_per_study(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    studies = [
        build_mr_study(tmp_path / f"s{n}", patient_id=f"SW-CC-{uuid.uuid4().hex[:6]}", n_slices=10)
        for n in range(SENDERS)
    ]
    app = start_listener(tmp_path, kafka_bootstrap_servers=kafka.bootstrap_servers)
    try:
        with ThreadPoolExecutor(SENDERS) as pool:
            list(pool.map(lambda files: storescu(files, "127.0.0.1", app.port, AE_TITLE), studies))
    finally:
        app.stop()
    uids = {
        pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID: files
        for files in studies
    }
    events = received_events(kafka.bootstrap_servers, set(uids), expected=SENDERS * 10)
    for study_uid, files in uids.items():
        assert [e.SOPInstanceUID for _, e, _ in events if e.StudyInstanceUID == study_uid] == [
            sop_uid(f) for f in files
        ]
