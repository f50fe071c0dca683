"""Unit tests of the C-STORE handler with real pynetdicom events, a real file store and a fake
publisher (no network)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from dicom_listener.adapters.filestore import FileStore, StoredInstance
from dicom_listener.adapters.publisher import PublishError
from dicom_listener.handlers import (
    CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_MISSING_UID,
    CANNOT_UNDERSTAND_UNDECODABLE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES_PUBLISH,
    OUT_OF_RESOURCES_STORAGE,
    SUCCESS,
    StoreContext,
    handle_echo,
    handle_store,
)
from dicom_listener.metrics import ListenerMetrics
from schemas.events import Event as SchemaEvent
from schemas.events import InstanceReceivedV1

CALLING_AE = "MODALITY1"
CALLED_AE = "SCANWATCH"


class FakePublisher:
    """Records what it is asked to publish; raises ``error`` instead when given one."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.published: list[tuple[SchemaEvent, str]] = []
        self.closed = False

    def publish(self, event: SchemaEvent, key: str) -> None:
        if self.error is not None:
            raise self.error
        self.published.append((event, key))

    def close(self) -> None:
        self.closed = True


class BrokenStore:
    """A store whose disk is full."""

    def put(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        raise OSError(28, "No space left on device")


def store_event(
    dataset: bytes,
    sop_instance_uid: str,
    sop_class_uid: str = MRImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Event:
    """A C-STORE event as pynetdicom builds it for a handler."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class_uid
    req.AffectedSOPInstanceUID = sop_instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(dataset)
    cx = PresentationContext()
    cx.context_id = 1
    cx.abstract_syntax = sop_class_uid
    cx.transfer_syntax = [transfer_syntax]
    assoc = SimpleNamespace(
        requestor=SimpleNamespace(ae_title=CALLING_AE), acceptor=SimpleNamespace(ae_title=CALLED_AE)
    )
    return Event(assoc, evt.EVT_C_STORE, {"request": req, "context": cx.as_tuple})  # type: ignore[arg-type]


@pytest.fixture
def encode(dataset_bytes: Callable[[bytes], bytes]) -> Callable[[pydicom.Dataset], bytes]:
    """A dataset as it travels in a C-STORE: explicit VR little endian, no file meta."""

    def _encode(ds: pydicom.Dataset) -> bytes:
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
        return dataset_bytes(out.getvalue())

    return _encode


@pytest.fixture
def instance(mr_series: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(mr_series[0])


@pytest.fixture
def wire(mr_series: list[Path], dataset_bytes: Callable[[bytes], bytes]) -> bytes:
    return dataset_bytes(mr_series[0].read_bytes())


def context(tmp_path: Path, publisher: FakePublisher, store: object = None) -> StoreContext:
    return StoreContext(
        store=store or FileStore(tmp_path / "store"),  # type: ignore[arg-type]
        publisher=publisher,
        metrics=ListenerMetrics(),
    )


def refused(ctx: StoreContext, reason: str) -> float:
    value = ctx.metrics.registry.get_sample_value(
        "scanwatch_listener_instances_refused_total", {"reason": reason}
    )
    return value or 0.0


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_success_stores_byte_exact_file_and_publishes_matching_event(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    dataset_bytes: Callable[[bytes], bytes],
) -> None:
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher)
    event = store_event(wire, instance.SOPInstanceUID)

    rsp = handle_store(event, ctx)

    assert rsp.Status == SUCCESS
    path = (
        tmp_path / "store" / instance.StudyInstanceUID / instance.SeriesInstanceUID
    ) / f"{instance.SOPInstanceUID}.dcm"
    data = path.read_bytes()
    assert data == event.encoded_dataset(include_meta=True)
    assert dataset_bytes(data) == wire
    meta = pydicom.dcmread(path).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == instance.SOPInstanceUID
    assert stored_files(tmp_path / "store") == [path], "no temporary file may remain"

    [(published, key)] = publisher.published
    assert isinstance(published, InstanceReceivedV1)
    assert key == instance.StudyInstanceUID
    assert published.StudyInstanceUID == instance.StudyInstanceUID
    assert published.SeriesInstanceUID == instance.SeriesInstanceUID
    assert published.SOPInstanceUID == instance.SOPInstanceUID
    assert published.SOPClassUID == MRImageStorage
    assert published.TransferSyntaxUID == ExplicitVRLittleEndian
    assert published.Modality == "MR"
    assert published.storage_uri == path.resolve().as_uri()
    assert published.size_bytes == len(data)
    assert published.sha256 == hashlib.sha256(data).hexdigest()
    assert (published.calling_ae_title, published.called_ae_title) == (CALLING_AE, CALLED_AE)
    registry = ctx.metrics.registry
    assert registry.get_sample_value("scanwatch_listener_instances_received_total") == 1
    assert registry.get_sample_value("scanwatch_listener_received_bytes_total") == len(data)
    assert registry.get_sample_value("scanwatch_listener_publish_seconds_count") == 1


def test_duplicate_send_replaces_the_file_and_publishes_again(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher)
    for _ in range(2):
        assert handle_store(store_event(wire, instance.SOPInstanceUID), ctx).Status == SUCCESS
    assert len(stored_files(tmp_path / "store")) == 1
    first, second = (event for event, _ in publisher.published)
    assert first.sha256 == second.sha256 and first.event_id != second.event_id


def test_publish_failure_is_a_failure_status_not_success(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    publisher = FakePublisher(error=PublishError("KafkaTimeoutError: no ack"))
    ctx = context(tmp_path, publisher)

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID), ctx)

    assert rsp.Status == OUT_OF_RESOURCES_PUBLISH
    assert "Kafka" in rsp.ErrorComment
    assert refused(ctx, "publish_failed") == 1
    assert ctx.metrics.registry.get_sample_value("scanwatch_listener_instances_received_total") == 0


def test_storage_failure_is_a_failure_status_and_nothing_is_published(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher, store=BrokenStore())

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID), ctx)

    assert rsp.Status == OUT_OF_RESOURCES_STORAGE
    assert publisher.published == []
    assert refused(ctx, "storage_failed") == 1


def test_unwritable_storage_dir_is_a_failure_status(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    not_a_dir = tmp_path / "store"
    not_a_dir.write_bytes(b"")  # a file where the store's root folder should be
    publisher = FakePublisher()
    ctx = StoreContext(FileStore(not_a_dir), publisher, ListenerMetrics())

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID), ctx)

    assert rsp.Status == OUT_OF_RESOURCES_STORAGE
    assert publisher.published == []


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_uid_is_refused_with_named_status(
    tmp_path: Path,
    instance: pydicom.Dataset,
    encode: Callable[[pydicom.Dataset], bytes],
    keyword: str,
) -> None:
    del instance[keyword]
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher)

    rsp = handle_store(store_event(encode(instance), instance.SOPInstanceUID), ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_MISSING_UID
    assert keyword in rsp.ErrorComment
    assert publisher.published == []
    assert stored_files(tmp_path / "store") == []
    assert refused(ctx, "missing_uid") == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uid_that_would_escape_the_store_is_refused(
    tmp_path: Path, instance: pydicom.Dataset, encode: Callable[[pydicom.Dataset], bytes]
) -> None:
    instance.StudyInstanceUID = "../../escaped"
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher)

    rsp = handle_store(store_event(encode(instance), instance.SOPInstanceUID), ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_INVALID_UID
    assert stored_files(tmp_path) == []
    assert publisher.published == []


def test_sop_class_differing_from_negotiated_one_is_refused(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher)
    event = store_event(wire, instance.SOPInstanceUID, sop_class_uid=EnhancedMRImageStorage)

    rsp = handle_store(event, ctx)

    assert rsp.Status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert publisher.published == []
    assert stored_files(tmp_path / "store") == []


def test_sop_instance_differing_from_affected_one_is_refused(tmp_path: Path, wire: bytes) -> None:
    ctx = context(tmp_path, FakePublisher())
    rsp = handle_store(store_event(wire, "1.2.3.4"), ctx)
    assert rsp.Status == CANNOT_UNDERSTAND_INSTANCE_MISMATCH


def test_undecodable_dataset_is_refused(tmp_path: Path) -> None:
    publisher = FakePublisher()
    ctx = context(tmp_path, publisher)
    event = store_event(
        b"not deflated data" * 4, "1.2.3.4", transfer_syntax=DeflatedExplicitVRLittleEndian
    )

    rsp = handle_store(event, ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_UNDECODABLE
    assert publisher.published == []
    assert refused(ctx, "undecodable") == 1


def test_echo_succeeds() -> None:
    assert handle_echo(SimpleNamespace()) == SUCCESS  # type: ignore[arg-type]


def test_filestore_rejects_malformed_uids(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        store.put("1.2", "1.2/../..", "1.3", b"x")
    assert stored_files(tmp_path) == []
