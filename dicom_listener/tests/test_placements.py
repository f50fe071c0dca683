"""Placing a received file with one flush on the C-STORE path: files received under names made
durable ahead of time (``FileStore.open_incoming``) and sealed, linked into place, the link
recorded in the outbox's ``placements``, the folders fsync'd later in batches
(``PlacementSettler``), a link that a crash lost redone when the outbox opens, and a commit that
a power cut took recorded again from the sealed file (a real file store and SQLite outbox)."""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from devtools.testing import logged, wait_for
from dicom_listener.adapters import filestore as filestore_module
from dicom_listener.adapters import outbox as outbox_module
from dicom_listener.adapters.filestore import READY_BATCH, FileStore, Seal
from dicom_listener.adapters.outbox import Outbox, PlacementSettler
from dicom_listener.app import create_app
from dicom_listener.config import Settings
from dicom_listener.dicom.contract import NormalizedRequest
from dicom_listener.dicom.statuses import SUCCESS
from dicom_listener.handlers import StoreContext, handle_store, record_unrecorded
from dicom_listener.procedure_steps import MPPS_SOP_CLASS, handle_procedure_step
from dicom_listener.tests.test_listener_handlers import (
    CALLED_AE,
    CALLING_AE,
    BrokenOutbox,
    context,
    store_event,
)
from dicom_listener.tests.test_procedure_steps import in_progress
from dicom_listener.tests.test_publisher import RecordingSink
from schemas.events import InstanceReceivedV1


@pytest.fixture
def folder_fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every folder fsync of the file store and the outbox, in order."""
    calls: list[Path] = []
    real = outbox_module.fsync_dir

    def counting(path: str | os.PathLike[str]) -> None:
        calls.append(Path(path))
        real(path)

    monkeypatch.setattr(outbox_module, "fsync_dir", counting)
    monkeypatch.setattr(filestore_module, "fsync_dir", counting)
    yield calls


def placements(outbox_path: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(outbox_path)) as conn:
        return conn.execute("SELECT staged, final FROM placements ORDER BY id").fetchall()


def file_store_context(tmp_path: Path) -> tuple[StoreContext, FileStore]:
    ctx = context(tmp_path)
    assert isinstance(ctx.store, FileStore)
    return ctx, ctx.store


def received_ready(store: FileStore, wire: bytes, sop: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A C-STORE's dataset as the listener receives it: written into a ready file."""
    plain = store_event(wire, sop, folder=tmp_path / "plain")
    path, fd = store.open_incoming()
    data = plain.path.read_bytes()
    os.write(fd, data)
    return dataclasses.replace(plain, path=path, fd=fd)


def other_instance(
    instance: pydicom.Dataset, encode: Callable[[pydicom.Dataset], bytes], n: int
) -> tuple[bytes, str]:
    """Another instance of ``instance``'s series (wire bytes, SOPInstanceUID)."""
    ds = copy.deepcopy(instance)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.99.{n}"
    return encode(ds), ds.SOPInstanceUID


def test_incoming_files_are_made_ready_a_batch_at_a_time_with_one_folder_fsync(
    tmp_path: Path, folder_fsyncs: list[Path]
) -> None:
    store = FileStore(tmp_path / "store")
    opened = [store.open_incoming()]  # none ready: this C-STORE makes the first batch
    assert folder_fsyncs.count(store.ready) == 1
    assert len(list(store.ready.iterdir())) == READY_BATCH
    # Half of it used: the next batch is made beside the C-STOREs, with one fsync.
    opened += [store.open_incoming() for _ in range(READY_BATCH // 2)]
    assert wait_for(lambda: len(list(store.ready.iterdir())) == 2 * READY_BATCH, timeout=10)
    assert wait_for(lambda: folder_fsyncs.count(store.ready) == 2, timeout=10)
    opened += [store.open_incoming() for _ in range(READY_BATCH // 2)]
    for _path, fd in opened:
        os.close(fd)
    paths = [path for path, _fd in opened]
    assert len(set(paths)) == len(paths)
    assert all(p.parent == store.ready and p.is_file() and p.stat().st_size == 0 for p in paths)


def test_a_file_received_under_a_durable_name_is_placed_without_a_folder_fsync(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    encode: Callable[[pydicom.Dataset], bytes],
    folder_fsyncs: list[Path],
) -> None:
    ctx, store = file_store_context(tmp_path)
    received = received_ready(store, wire, instance.SOPInstanceUID, tmp_path)
    assert handle_store(received, ctx).Status == SUCCESS
    series = store.folder_for(instance.StudyInstanceUID, instance.SeriesInstanceUID, "1.2")
    final = series / f"{instance.SOPInstanceUID}.dcm"
    assert hashlib.sha256(final.read_bytes()).hexdigest() == received.sha256
    # The second instance of the series: its folder exists, so no folder fsync at all.
    del folder_fsyncs[:]
    data, sop = other_instance(instance, encode, 2)
    assert handle_store(received_ready(store, data, sop, tmp_path), ctx).Status == SUCCESS
    assert folder_fsyncs == []
    rows = placements(tmp_path / "outbox.sqlite3")
    assert [Path(final) for _staged, final in rows] == [final, series / f"{sop}.dcm"]
    assert all(Path(staged).parent == store.ready for staged, _final in rows)
    assert len(ctx.outbox.pending(10)) == 2

    # Linked: each file keeps its durable incoming name until its placement is settled.
    assert all(Path(staged).samefile(final) for staged, final in rows)

    assert ctx.outbox.settle_placements() == 2
    assert folder_fsyncs == [series]  # one fsync for the two files
    assert placements(tmp_path / "outbox.sqlite3") == []
    assert not any(Path(staged).exists() for staged, _final in rows)
    assert hashlib.sha256(final.read_bytes()).hexdigest() == received.sha256


def test_a_file_received_under_a_new_name_still_has_its_folder_fsynced_before_the_answer(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    encode: Callable[[pydicom.Dataset], bytes],
    folder_fsyncs: list[Path],
) -> None:
    ctx = context(tmp_path)
    handle_store(store_event(wire, instance.SOPInstanceUID, folder=tmp_path / "in"), ctx)
    del folder_fsyncs[:]
    data, sop = other_instance(instance, encode, 2)
    assert handle_store(store_event(data, sop, folder=tmp_path / "in"), ctx).Status == SUCCESS
    series = tmp_path / "store" / instance.StudyInstanceUID / instance.SeriesInstanceUID
    assert folder_fsyncs == [series.resolve()]
    assert placements(tmp_path / "outbox.sqlite3") == []


def test_a_link_lost_in_a_crash_is_redone_when_the_outbox_opens(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx, store = file_store_context(tmp_path)
    received = received_ready(store, wire, instance.SOPInstanceUID, tmp_path)
    assert handle_store(received, ctx).Status == SUCCESS
    [(staged, final)] = placements(tmp_path / "outbox.sqlite3")
    content = Path(final).read_bytes()
    ctx.outbox.close()
    # The power cut kept the file's bytes, its durable name and the commit, not the link.
    Path(final).unlink()

    reopened = Outbox(tmp_path / "outbox.sqlite3")
    reopened.open()
    assert Path(final).read_bytes() == content and not Path(staged).exists()
    assert placements(tmp_path / "outbox.sqlite3") == []
    # Its commit survived: nothing to record again.
    assert record_unrecorded(store, dataclasses.replace(ctx, outbox=reopened)) == 0
    # The start-up sweep that follows removes temporaries, not the placed file.
    FileStore(tmp_path / "store").sweep_temporaries()
    assert Path(final).read_bytes() == content
    [event] = reopened.pending(10)
    assert event.key == instance.StudyInstanceUID.encode()
    reopened.close()


def test_a_crash_before_the_rename_leaves_nothing_to_redo(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    """Not recorded means not answered: the sweep removes the file and the sender retries."""
    ctx, store = file_store_context(tmp_path)
    received_ready(store, wire, instance.SOPInstanceUID, tmp_path)  # received, never handled
    ctx.outbox.open()
    assert placements(tmp_path / "outbox.sqlite3") == []
    restarted = FileStore(tmp_path / "store")
    assert restarted.sweep_temporaries() == 1  # the one ready file that holds bytes
    assert not any(restarted.ready.iterdir())


def test_the_settler_settles_placements_in_the_background(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    encode: Callable[[pydicom.Dataset], bytes],
) -> None:
    ctx, store = file_store_context(tmp_path)
    settler = PlacementSettler(ctx.outbox, interval_s=0.01)
    settler.start()
    try:
        for n in range(3):
            data, sop = other_instance(instance, encode, n)
            assert handle_store(received_ready(store, data, sop, tmp_path), ctx).Status == SUCCESS
        assert wait_for(lambda: placements(tmp_path / "outbox.sqlite3") == [], timeout=10)
    finally:
        settler.stop()
    assert len(ctx.outbox.pending(10)) == 3


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every flush of an outbox's commits (``Outbox.sync``), by database path."""
    calls: list[Path] = []
    real = Outbox.sync

    def counting(self: Outbox) -> None:
        calls.append(self.path)
        real(self)

    monkeypatch.setattr(Outbox, "sync", counting)
    yield calls


def test_a_sealed_c_store_is_answered_without_flushing_the_outbox(
    tmp_path: Path,
    instance: pydicom.Dataset,
    wire: bytes,
    encode: Callable[[pydicom.Dataset], bytes],
    flushes: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx, store = file_store_context(tmp_path)
    received = received_ready(store, wire, instance.SOPInstanceUID, tmp_path)
    assert handle_store(received, ctx).Status == SUCCESS
    assert flushes == []  # one flush for this C-STORE: its file's
    [(staged, _final)] = placements(tmp_path / "outbox.sqlite3")
    assert Seal.decode(os.getxattr(staged, filestore_module.SEAL_XATTR)) == Seal(
        received.sha256, CALLING_AE, CALLED_AE
    )
    # A file received under a name that is not durable: nothing could rebuild its record.
    data, sop = other_instance(instance, encode, 2)
    assert handle_store(store_event(data, sop, folder=tmp_path / "in"), ctx).Status == SUCCESS
    assert len(flushes) == 1

    # A filesystem without user extended attributes: no seal, so the commit is flushed.
    def no_xattrs(*_args: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", no_xattrs)
    data, sop = other_instance(instance, encode, 3)
    assert handle_store(received_ready(store, data, sop, tmp_path), ctx).Status == SUCCESS
    assert len(flushes) == 2
    assert len(ctx.outbox.pending(10)) == 3


def snapshot(database: Path, into: Path) -> None:
    """The outbox's files as a disk would hold them before its next commit is flushed."""
    into.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy2(f"{database}{suffix}", into / f"{database.name}{suffix}")


def power_cut(database: Path, kept: Path) -> None:
    """What a power cut leaves of the outbox: the files of ``snapshot`` (the commits after it
    were never flushed), no shared-memory index."""
    for suffix in ("", "-wal"):
        shutil.copy2(kept / f"{database.name}{suffix}", f"{database}{suffix}")
    Path(f"{database}-shm").unlink(missing_ok=True)


@pytest.mark.parametrize("link_kept", [True, False], ids=["link-kept", "link-lost"])
def test_a_commit_a_power_cut_took_is_recorded_again_from_the_sealed_file(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes, link_kept: bool
) -> None:
    database = tmp_path / "outbox.sqlite3"
    ctx, store = file_store_context(tmp_path)
    ctx.outbox.open()
    snapshot(database, tmp_path / "flushed")
    received = received_ready(store, wire, instance.SOPInstanceUID, tmp_path)
    assert handle_store(received, ctx).Status == SUCCESS  # answered: the sender will not resend
    [(staged, final)] = placements(database)
    content = Path(final).read_bytes()
    ctx.outbox.close()
    power_cut(database, tmp_path / "flushed")
    if not link_kept:
        Path(final).unlink()
    assert placements(database) == [] and Outbox(database).pending(10) == []  # the commit is gone

    restarted = context(tmp_path)
    restarted.outbox.open()
    assert record_unrecorded(FileStore(tmp_path / "store"), restarted) == 1
    [event] = restarted.outbox.pending(10)
    recorded = InstanceReceivedV1.from_bytes(event.value)
    assert (recorded.SOPInstanceUID, recorded.sha256) == (instance.SOPInstanceUID, received.sha256)
    assert (recorded.calling_ae_title, recorded.called_ae_title) == (CALLING_AE, CALLED_AE)
    assert recorded.storage_uri == Path(final).as_uri()
    assert event.key == instance.StudyInstanceUID.encode()
    assert Path(final).read_bytes() == content
    assert restarted.outbox.stored([instance.SOPInstanceUID]) == {
        instance.SOPInstanceUID: Path(final).as_uri()
    }
    # Nothing left under an incoming name, nothing recorded twice.
    assert not Path(staged).exists() and placements(database) == []
    assert record_unrecorded(FileStore(tmp_path / "store"), restarted) == 0
    assert FileStore(tmp_path / "store").sweep_temporaries() == 0
    assert len(restarted.outbox.pending(10)) == 1


def sealed_unrecorded(store: FileStore, wire: bytes, instance: pydicom.Dataset, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A received file sealed and fsync'd, whose commit never happened (or was lost)."""
    received = received_ready(store, wire, instance.SOPInstanceUID, tmp_path)
    uids = (instance.StudyInstanceUID, instance.SeriesInstanceUID, instance.SOPInstanceUID)
    seal = Seal(received.sha256, CALLING_AE, CALLED_AE)
    staged = store.adopt(
        received.path, *uids, received.sha256, received.size_bytes, received.fd, seal
    )
    os.close(received.fd)
    assert staged.sealed
    return received


def test_a_file_whose_bytes_differ_from_its_seal_is_swept_not_recorded(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    """A power cut during its write kept part of the bytes: its C-STORE was never answered."""
    ctx, store = file_store_context(tmp_path)
    received = sealed_unrecorded(store, wire, instance, tmp_path)
    os.truncate(received.path, received.size_bytes - 64)
    ctx.outbox.open()
    assert record_unrecorded(FileStore(tmp_path / "store"), ctx) == 0
    assert ctx.outbox.pending(10) == []
    assert FileStore(tmp_path / "store").sweep_temporaries() == 1
    assert not received.path.exists()


def test_a_sealed_file_that_cannot_be_recorded_is_kept_for_an_operator(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    store = FileStore(tmp_path / "store")
    received = sealed_unrecorded(store, wire, instance, tmp_path)
    content = received.path.read_bytes()
    broken = context(tmp_path, outbox=BrokenOutbox(tmp_path / "outbox.sqlite3"))
    with logged("dicom_listener.handlers") as records:
        assert record_unrecorded(FileStore(tmp_path / "store"), broken) == 0
    [kept] = (tmp_path / "quarantine").iterdir()
    assert kept.read_bytes() == content and "unrecorded" in kept.name
    [said] = [r for r in records if r.levelno == logging.ERROR and "start-up" in r.getMessage()]
    assert said.quarantined_as == kept.name  # type: ignore[attr-defined]
    # Out of the sweep's way: only the files made ready for later C-STOREs are left, empty.
    assert all(p.stat().st_size == 0 for p in store.ready.iterdir())


def test_the_listener_records_a_lost_commit_before_it_serves_and_publishes_it(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    store = FileStore(tmp_path / "store")
    received = sealed_unrecorded(store, wire, instance, tmp_path)
    sink = RecordingSink()
    settings = Settings(  # type: ignore[call-arg]
        ae_title="SCANWATCH", host="127.0.0.1", port=0, storage_dir=tmp_path / "store"
    )
    app = create_app(settings, sink=sink)
    app.start()
    try:
        assert wait_for(lambda: len(sink.sent) == 1, timeout=10)
    finally:
        app.stop()
    recorded = InstanceReceivedV1.from_bytes(sink.sent[0])
    assert (recorded.SOPInstanceUID, recorded.sha256) == (instance.SOPInstanceUID, received.sha256)
    stored = Path(url2pathname(urlparse(recorded.storage_uri).path))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == received.sha256
    assert [p for p in store.ready.iterdir() if p.stat().st_size] == []


def test_a_procedure_step_is_flushed_before_it_is_answered(
    tmp_path: Path, flushes: list[Path]
) -> None:
    """No file would rebuild an MPPS step: its commit is flushed, as every commit is unless its
    request says it is rebuildable."""
    ctx = context(tmp_path)
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    pydicom.filewriter.write_dataset(out, in_progress(generate_uid()))
    request = NormalizedRequest(
        "N-CREATE",
        MPPS_SOP_CLASS,
        generate_uid(),
        out.getvalue(),
        ExplicitVRLittleEndian,
        CALLING_AE,
        CALLED_AE,
    )
    assert handle_procedure_step(request, ctx).status.Status == SUCCESS
    assert flushes == [tmp_path / "outbox.sqlite3"]
