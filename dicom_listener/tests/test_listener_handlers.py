"""Unit tests of the C-STORE handler with received instances as the network side hands them
over (a temporary Part 10 file), a real file store and a real SQLite outbox (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from devtools.testing import wait_for
from dicom_listener.adapters import outbox as outbox_module
from dicom_listener.adapters.filestore import FileStore, Quarantine, StagedInstance
from dicom_listener.adapters.outbox import Outbox, OutboxEvent, OutboxTransaction
from dicom_listener.dicom.contract import ReceivedInstance
from dicom_listener.dicom.file_meta import file_meta_bytes
from dicom_listener.dicom.statuses import (
    CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_MISSING_UID,
    CANNOT_UNDERSTAND_TRUNCATED,
    CANNOT_UNDERSTAND_UNDECODABLE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES_DISK_LOW,
    OUT_OF_RESOURCES_OUTBOX_FULL,
    OUT_OF_RESOURCES_OUTBOX_WRITE,
    OUT_OF_RESOURCES_STORAGE,
    SUCCESS,
)
from dicom_listener.handlers import (
    HEADER_INSTANCE_VERSION,
    HEADER_SUPERSEDES_SHA256,
    Admission,
    StoreContext,
    handle_store,
)
from dicom_listener.metrics import ListenerMetrics
from schemas.events import InstanceReceivedV1

CALLING_AE = "MODALITY1"
CALLED_AE = "SCANWATCH"


class BrokenStore(FileStore):
    """A store whose disk is full."""

    def adopt(
        self, path, study_uid, series_uid, sop_uid, sha256, size, fd=-1, seal=None
    ) -> StagedInstance:  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")


class BrokenOutbox(Outbox):
    """An outbox whose database cannot be written (its commit fails)."""

    def submit(self, work, arrival=None):  # type: ignore[no-untyped-def]
        raise OSError(5, "I/O error")


_names = itertools.count()


def store_event(
    dataset: bytes,
    sop_instance_uid: str,
    sop_class_uid: str = MRImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    folder: Path,
) -> ReceivedInstance:
    """A C-STORE's dataset as the network side hands it to the handler: a Part 10 file
    (the file meta built from the request and the context) in ``folder``."""
    data = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax) + dataset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{next(_names)}.tmp"
    path.write_bytes(data)
    return ReceivedInstance(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        sop_class_uid=sop_class_uid,
        transfer_syntax=transfer_syntax,
        affected_sop_instance_uid=sop_instance_uid,
        calling_ae_title=CALLING_AE,
        called_ae_title=CALLED_AE,
    )


def context(
    tmp_path: Path,
    store: FileStore | None = None,
    outbox: Outbox | None = None,
    min_free_bytes: int = 0,
    max_events: int = 1000,
) -> StoreContext:
    outbox = outbox or Outbox(tmp_path / "outbox.sqlite3")
    return StoreContext(
        store=store or FileStore(tmp_path / "store"),
        outbox=outbox,
        metrics=ListenerMetrics(),
        quarantine=Quarantine(tmp_path / "quarantine"),
        admission=Admission(tmp_path, min_free_bytes, outbox, max_events, check_interval_s=0),
    )


def events(ctx: StoreContext) -> list[OutboxEvent]:
    return ctx.outbox.pending(1000)


def refused(ctx: StoreContext, reason: str) -> float:
    value = ctx.metrics.registry.get_sample_value(
        "scanwatch_listener_instances_refused_total", {"reason": reason}
    )
    return value or 0.0


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_success_stores_byte_exact_file_and_records_matching_event(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    dataset_bytes: Callable[[bytes], bytes],
) -> None:
    ctx = context(tmp_path)
    event = store_event(wire, instance.SOPInstanceUID, folder=tmp_path)

    rsp = handle_store(event, ctx)

    assert rsp.Status == SUCCESS
    path = (
        tmp_path / "store" / instance.StudyInstanceUID / instance.SeriesInstanceUID
    ) / f"{instance.SOPInstanceUID}.dcm"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == event.sha256 and len(data) == event.size_bytes
    assert dataset_bytes(data) == wire
    meta = pydicom.dcmread(path).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPInstanceUID == instance.SOPInstanceUID
    assert stored_files(tmp_path / "store") == [path], "no temporary file may remain"

    [outboxed] = events(ctx)
    assert outboxed.topic == InstanceReceivedV1.SCHEMA
    assert outboxed.key == instance.StudyInstanceUID.encode()
    # The counts the instance carries (the sample has an AcquisitionNumber, no other).
    assert outboxed.headers == [("scanwatch-acquisition-number", b"1")]
    published = InstanceReceivedV1.from_bytes(outboxed.value)
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
    assert registry.get_sample_value("scanwatch_listener_store_seconds_count") == 1


def test_event_survives_reopening_the_outbox(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx = context(tmp_path)
    assert (
        handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx).Status
        == SUCCESS
    )
    ctx.outbox.close()
    [event] = Outbox(tmp_path / "outbox.sqlite3").pending(10)
    assert InstanceReceivedV1.from_bytes(event.value).SOPInstanceUID == instance.SOPInstanceUID


def test_duplicate_send_with_same_bytes_records_no_second_event(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx = context(tmp_path)
    for _ in range(2):
        assert (
            handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx).Status
            == SUCCESS
        )
    assert len(stored_files(tmp_path / "store")) == 1
    assert len(events(ctx)) == 1
    assert (
        ctx.metrics.registry.get_sample_value("scanwatch_listener_instances_duplicate_total") == 1
    )


def test_same_instance_with_other_bytes_is_kept_as_a_flagged_new_version(
    tmp_path: Path, instance: pydicom.Dataset, encode: Callable[[pydicom.Dataset], bytes]
) -> None:
    ctx = context(tmp_path)
    first = encode(instance)
    instance.SeriesDescription = "T1 AX corrected"
    second = encode(instance)
    assert (
        handle_store(store_event(first, instance.SOPInstanceUID, folder=tmp_path), ctx).Status
        == SUCCESS
    )
    assert (
        handle_store(store_event(second, instance.SOPInstanceUID, folder=tmp_path), ctx).Status
        == SUCCESS
    )
    assert (
        handle_store(store_event(second, instance.SOPInstanceUID, folder=tmp_path), ctx).Status
        == SUCCESS
    )

    folder = tmp_path / "store" / instance.StudyInstanceUID / instance.SeriesInstanceUID
    v1, v2 = folder / f"{instance.SOPInstanceUID}.dcm", folder / f"{instance.SOPInstanceUID}.v2.dcm"
    assert stored_files(tmp_path / "store") == sorted([v1, v2])
    assert pydicom.dcmread(v2).SeriesDescription == "T1 AX corrected"
    assert pydicom.dcmread(v1).SeriesDescription == "T1 AX"
    old, new = events(ctx)
    assert dict(old.headers) == {"scanwatch-acquisition-number": b"1"}
    assert dict(new.headers) == {
        "scanwatch-acquisition-number": b"1",
        HEADER_INSTANCE_VERSION: b"2",
        HEADER_SUPERSEDES_SHA256: hashlib.sha256(v1.read_bytes()).hexdigest().encode(),
    }
    event = InstanceReceivedV1.from_bytes(new.value)
    assert event.storage_uri == v2.resolve().as_uri()
    assert event.sha256 == hashlib.sha256(v2.read_bytes()).hexdigest()


def test_outbox_failure_is_a_failure_status_and_nothing_stays_stored(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx = context(tmp_path, outbox=BrokenOutbox(tmp_path / "outbox.sqlite3"))

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx)

    assert rsp.Status == OUT_OF_RESOURCES_OUTBOX_WRITE
    assert refused(ctx, "outbox_failed") == 1
    assert stored_files(tmp_path / "store") == []
    assert ctx.metrics.registry.get_sample_value("scanwatch_listener_instances_received_total") == 0


def test_storage_failure_is_a_failure_status_and_nothing_is_recorded(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx = context(tmp_path, store=BrokenStore(tmp_path / "store"))

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx)

    assert rsp.Status == OUT_OF_RESOURCES_STORAGE
    assert events(ctx) == []
    assert refused(ctx, "storage_failed") == 1


def test_unwritable_storage_dir_is_a_failure_status(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    not_a_dir = tmp_path / "store"
    not_a_dir.write_bytes(b"")  # a file where the store's root folder should be
    ctx = context(tmp_path, store=FileStore(not_a_dir))

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx)

    assert rsp.Status == OUT_OF_RESOURCES_STORAGE
    assert events(ctx) == []


def test_disk_below_watermark_is_out_of_resources_and_recovers(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path, min_free_bytes=10**9)
    free = {"bytes": 10**6}
    monkeypatch.setattr(ctx.admission, "free_bytes", lambda: free["bytes"])

    rsp = handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx)
    assert rsp.Status == OUT_OF_RESOURCES_DISK_LOW
    assert stored_files(tmp_path / "store") == [] and events(ctx) == []
    assert refused(ctx, "disk_low") == 1

    free["bytes"] = 10**10  # space came back
    assert (
        handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path), ctx).Status
        == SUCCESS
    )


def test_full_outbox_is_out_of_resources_until_it_drains(
    tmp_path: Path, mr_series: list[Path], dataset_bytes: Callable[[bytes], bytes]
) -> None:
    ctx = context(tmp_path, max_events=2)
    sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr_series[:3]]
    wires = [dataset_bytes(p.read_bytes()) for p in mr_series[:3]]
    assert [
        handle_store(store_event(w, u, folder=tmp_path), ctx).Status
        for w, u in zip(wires, sops, strict=True)
    ] == [
        SUCCESS,
        SUCCESS,
        OUT_OF_RESOURCES_OUTBOX_FULL,
    ]
    ctx.outbox.delivered([e.seq for e in events(ctx)])  # the publisher caught up
    assert handle_store(store_event(wires[2], sops[2], folder=tmp_path), ctx).Status == SUCCESS


def quarantined(tmp_path: Path) -> list[Path]:
    return stored_files(tmp_path / "quarantine")


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_uid_is_refused_with_named_status_and_quarantined(
    tmp_path: Path,
    instance: pydicom.Dataset,
    encode: Callable[[pydicom.Dataset], bytes],
    keyword: str,
) -> None:
    del instance[keyword]
    ctx = context(tmp_path)
    event = store_event(encode(instance), instance.SOPInstanceUID, folder=tmp_path)

    rsp = handle_store(event, ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_MISSING_UID
    assert keyword in rsp.ErrorComment
    assert events(ctx) == []
    assert stored_files(tmp_path / "store") == []
    assert refused(ctx, "missing_uid") == 1
    [copy] = quarantined(tmp_path)
    assert "missing_uid" in copy.name
    assert copy.read_bytes() == event.path.read_bytes()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uid_that_would_escape_the_store_is_refused(
    tmp_path: Path, instance: pydicom.Dataset, encode: Callable[[pydicom.Dataset], bytes]
) -> None:
    instance.StudyInstanceUID = "../../escaped"
    ctx = context(tmp_path)

    rsp = handle_store(store_event(encode(instance), instance.SOPInstanceUID, folder=tmp_path), ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_INVALID_UID
    assert stored_files(tmp_path / "store") == []
    assert not (tmp_path / "escaped").exists()
    assert events(ctx) == []
    assert len(quarantined(tmp_path)) == 1


def test_sop_class_differing_from_negotiated_one_is_refused(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx = context(tmp_path)
    event = store_event(
        wire, instance.SOPInstanceUID, sop_class_uid=EnhancedMRImageStorage, folder=tmp_path
    )

    rsp = handle_store(event, ctx)

    assert rsp.Status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert events(ctx) == []
    assert stored_files(tmp_path / "store") == []
    assert "sop_class_mismatch" in quarantined(tmp_path)[0].name


def test_sop_instance_differing_from_affected_one_is_refused(tmp_path: Path, wire: bytes) -> None:
    ctx = context(tmp_path)
    rsp = handle_store(store_event(wire, "1.2.3.4", folder=tmp_path), ctx)
    assert rsp.Status == CANNOT_UNDERSTAND_INSTANCE_MISMATCH


def test_undecodable_dataset_is_refused(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    event = store_event(
        b"not deflated data" * 4,
        "1.2.3.4",
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        folder=tmp_path,
    )

    rsp = handle_store(event, ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_UNDECODABLE
    assert events(ctx) == []
    assert refused(ctx, "undecodable") == 1
    assert len(quarantined(tmp_path)) == 1


@pytest.mark.parametrize("cut", [1000, 40_000, 91_000])
def test_truncated_dataset_is_refused_and_quarantined(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    caplog: pytest.LogCaptureFixture,
    cut: int,
) -> None:
    ctx = context(tmp_path)
    rsp = handle_store(store_event(wire[:-cut], instance.SOPInstanceUID, folder=tmp_path), ctx)
    assert rsp.Status == CANNOT_UNDERSTAND_TRUNCATED
    assert stored_files(tmp_path / "store") == [] and events(ctx) == []
    assert len(quarantined(tmp_path)) == 1
    [record] = [r for r in caplog.records if r.getMessage().startswith("C-STORE refused")]
    assert record.reason == "truncated"  # type: ignore[attr-defined]
    assert str(instance.PatientName) not in caplog.text


def test_write_failure_while_receiving_is_out_of_resources(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx = context(tmp_path)
    received = store_event(wire, instance.SOPInstanceUID, folder=tmp_path)
    failed = dataclasses.replace(received, write_error=OSError(28, "No space left on device"))

    assert handle_store(failed, ctx).Status == OUT_OF_RESOURCES_STORAGE
    assert refused(ctx, "storage_failed") == 1
    assert stored_files(tmp_path / "store") == [] and events(ctx) == []


def test_filestore_rejects_malformed_uids(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        store.adopt(tmp_path / "x.tmp", "1.2", "1.2/../..", "1.3", "0" * 64, 1)
    assert stored_files(tmp_path) == []


def test_sweep_removes_only_temporary_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.incoming.mkdir()
    left, received = store.incoming / "a.tmp", store.incoming / "b.tmp"
    left.write_bytes(b"abc")
    received.write_bytes(b"def")
    staged = store.adopt(received, "1.2", "1.2.3", "1.2.3.5", "0" * 64, 3)
    kept = store.commit(staged, 1)
    assert store.sweep_temporaries() == 1
    assert not left.exists() and kept.path.read_bytes() == b"def"


def test_group_commit_isolates_a_failing_request(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    undone: list[str] = []

    def good(tx):  # type: ignore[no-untyped-def]
        tx.record("1.2.3", "a" * 64, 1, "file:///x", topic="t", key=b"k", value=b"v")
        return "ok"

    def bad(tx):  # type: ignore[no-untyped-def]
        tx.record("1.2.4", "b" * 64, 1, "file:///y", topic="t", key=b"k", value=b"w")
        tx.on_rollback(lambda: undone.append("1.2.4"))
        raise ValueError("broken instance")

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(outbox.submit, work) for work in (bad, good, bad, good)]
    assert futures[1].result() == "ok"
    with pytest.raises(ValueError, match="broken"):
        futures[0].result()
    assert [e.value for e in outbox.pending(10)] == [b"v", b"v"]
    assert undone == ["1.2.4", "1.2.4"]
    outbox.close()


def _record(sop: str) -> Callable[[OutboxTransaction], str]:
    def work(tx: OutboxTransaction) -> str:
        tx.record(sop, "a" * 64, 1, f"file:///{sop}", topic="t", key=b"k", value=sop.encode())
        return sop

    return work


def test_group_commit_waits_for_an_announced_cstore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request announced before the leader commits (its file still being fsync'd) joins
    the leader's transaction instead of paying for a commit of its own."""
    monkeypatch.setattr(outbox_module, "GROUP_COMMIT_WAIT_S", 30.0)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    commits: list[int] = []
    outbox.on_commit(lambda: commits.append(len(outbox.pending(10))))
    late = outbox.announce()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(outbox.submit, _record("1.2.1"))
        assert wait_for(lambda: outbox._requests.qsize() == 1, timeout=10)
        assert not first.done(), "the leader waits for the announced request"
        assert outbox.submit(_record("1.2.2"), late) == "1.2.2"
        assert first.result(timeout=10) == "1.2.1"
    assert commits == [2], "one commit carried both"
    outbox.close()


def test_a_withdrawn_announcement_does_not_hold_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE refused after announcing itself withdraws; the next commit does not wait
    for it (with a 30 s limit, this test would time out if it did)."""
    monkeypatch.setattr(outbox_module, "GROUP_COMMIT_WAIT_S", 30.0)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    refused = outbox.announce()
    refused.withdraw()
    refused.withdraw()  # idempotent: counted once
    own = outbox.announce()
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(outbox.submit, _record("1.2.3"), own)
        assert result.result(timeout=10) == "1.2.3"
    assert outbox._announced == 0
    outbox.close()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_the_event_carries_the_counts_that_tell_a_series_complete(
    tmp_path: Path, instance: pydicom.Dataset, syntax: str
) -> None:
    """ImagesInAcquisition, AcquisitionNumber and NumberOfFrames go with the event as Kafka
    headers (the event's schema is published: it does not change), read by the fast scan and
    by pydicom alike; one the instance lacks (NumberOfFrames here) is left out."""
    ctx = context(tmp_path)
    instance.ImagesInAcquisition = 38
    instance.AcquisitionNumber = 2
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = syntax != ExplicitVRBigEndian, False
    del instance.PixelData  # the header is what is read; big endian pixels would need a swap
    write_dataset(out, instance)
    wire = out.getvalue()
    event = store_event(wire, instance.SOPInstanceUID, folder=tmp_path, transfer_syntax=syntax)
    assert handle_store(event, ctx).Status == SUCCESS
    [outboxed] = events(ctx)
    assert dict(outboxed.headers) == {
        "scanwatch-images-in-acquisition": b"38",
        "scanwatch-acquisition-number": b"2",
    }
