"""Placing a received file without an fsync of its folder on the C-STORE path: files received
under names made durable ahead of time (``FileStore.open_incoming``), the rename recorded in
the outbox's ``placements``, the folders fsync'd later in batches (``PlacementSettler``), and a
rename that a crash lost redone when the outbox opens (a real file store and SQLite outbox)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from devtools.testing import wait_for
from dicom_listener.adapters import filestore as filestore_module
from dicom_listener.adapters import outbox as outbox_module
from dicom_listener.adapters.filestore import READY_BATCH, FileStore
from dicom_listener.adapters.outbox import Outbox, PlacementSettler
from dicom_listener.dicom.statuses import SUCCESS
from dicom_listener.handlers import StoreContext, handle_store
from dicom_listener.tests.test_listener_handlers import context, store_event


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
    with sqlite3.connect(outbox_path) as conn:
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

    assert ctx.outbox.settle_placements() == 2
    assert folder_fsyncs == [series]  # one fsync for the two files
    assert placements(tmp_path / "outbox.sqlite3") == []


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


def test_a_rename_lost_in_a_crash_is_redone_when_the_outbox_opens(
    tmp_path: Path, instance: pydicom.Dataset, wire: bytes
) -> None:
    ctx, store = file_store_context(tmp_path)
    received = received_ready(store, wire, instance.SOPInstanceUID, tmp_path)
    assert handle_store(received, ctx).Status == SUCCESS
    [(staged, final)] = placements(tmp_path / "outbox.sqlite3")
    content = Path(final).read_bytes()
    ctx.outbox.close()
    # The power cut kept the file's bytes and its durable name, not the rename.
    os.replace(final, staged)

    reopened = Outbox(tmp_path / "outbox.sqlite3")
    reopened.open()
    assert Path(final).read_bytes() == content and not Path(staged).exists()
    assert placements(tmp_path / "outbox.sqlite3") == []
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
