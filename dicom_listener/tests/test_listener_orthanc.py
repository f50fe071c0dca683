"""A real PACS as sender: Orthanc pushes a study to the listener through its REST API."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from devtools.kafka_local import LocalKafka, free_port
from devtools.orthanc import LocalOrthanc
from dicom_listener.tests.helpers import received_events, sop_uid
from dicom_listener.tests.test_listener_integration import AE_TITLE, start_listener
from scanwatch.sample import build_mr_study

pytestmark = pytest.mark.integration


def test_orthanc_pushes_a_study_with_modalities_store(
    kafka: LocalKafka, tmp_path: Path, dataset_bytes: Callable[[bytes], bytes]
) -> None:
    files = build_mr_study(
        tmp_path / "sent", patient_id=f"SW-ORTHANC-{uuid.uuid4().hex[:6]}", n_slices=12
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID
    app = start_listener(
        tmp_path, kafka_bootstrap_servers=kafka.bootstrap_servers, allowed_calling_aes="ORTHANC"
    )
    orthanc = LocalOrthanc(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={"scanwatch": (AE_TITLE, "127.0.0.1", app.port)},
    )
    try:
        orthanc.start()
        [study_id] = {answer["ParentStudy"] for answer in orthanc.upload(files)}
        orthanc.store_to("scanwatch", [study_id])

        folder = app.settings.storage_dir / study_uid / series_uid
        for sent in files:
            stored = (folder / f"{sop_uid(sent)}.dcm").read_bytes()
            assert dataset_bytes(stored) == dataset_bytes(sent.read_bytes())
        events = received_events(kafka.bootstrap_servers, {study_uid}, expected=len(files))
        assert sorted(e.SOPInstanceUID for _, e, _ in events) == sorted(map(sop_uid, files))
        assert {e.calling_ae_title for _, e, _ in events} == {"ORTHANC"}
    finally:
        orthanc.stop()
        app.stop()
