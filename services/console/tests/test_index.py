"""The index follows the listener's layout (its own file-name function), tops itself up with
what is new, takes a re-sent instance's newest version and forgets removed files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from dicom_listener.adapters.filestore import FileStore, instance_file_name
from scanwatch.database import make_engine
from scanwatch.logs import JsonFormatter
from services.console.index import StoreIndex, parse_file_name, series_table
from services.console.tests.helpers import put, relabelled


@pytest.mark.parametrize("version", [1, 2, 10])
def test_file_names_are_the_listeners(version: int) -> None:
    sop = "1.2.826.0.1.3680043.8.498.1"
    assert parse_file_name(instance_file_name(sop, version)) == (sop, version)


@pytest.mark.parametrize("name", ["x.dcm", "1..2.dcm", "1.2.v.dcm", "1.2.dcm.tmp", "../1.dcm"])
def test_other_names_are_not_instances(name: str) -> None:
    assert parse_file_name(name) is None


def test_top_up_reads_only_what_is_new(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    mr = Path(get_testdata_file("MR_small.dcm"))
    first = relabelled(mr, tmp_path / "a.dcm", SeriesDescription="first")
    ds = pydicom.dcmread(first)
    put(store, first)
    index = StoreIndex(store.root, make_engine(f"sqlite:///{tmp_path / 'index.db'}"))
    assert index.top_up().read == 1  # type: ignore[union-attr]
    assert index.top_up().read == 0  # type: ignore[union-attr]

    # A second instance of the same series and a new version of the first (other bytes).
    same_series = {
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SeriesDescription": "second",
    }
    put(store, relabelled(mr, tmp_path / "b.dcm", **same_series))
    second = relabelled(
        first, tmp_path / "a2.dcm", StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID, SOPInstanceUID=ds.SOPInstanceUID,
        SeriesDescription="second",
    )  # fmt: skip
    put(store, second, version=2)
    result = index.top_up()
    assert result is not None and result.read == 2 and index.instances_indexed == 2
    with index.engine.connect() as conn:
        described = conn.execute(select(series_table.c.SeriesDescription)).scalars().all()
    assert described == ["second"]  # the newest version's header, not the first's

    # A fresh index over the same database reads nothing again.
    again = StoreIndex(store.root, index.engine)
    assert again.top_up().read == 0  # type: ignore[union-attr]
    assert again.instances_indexed == 2

    # A removed file leaves the index.
    store.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, 2).unlink()
    store.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, 1).unlink()
    result = again.top_up()
    assert result is not None and result.removed == 1 and again.instances_indexed == 1


def test_a_scan_started_after_a_request_serves_it(tmp_path: Path) -> None:
    index = StoreIndex(tmp_path, make_engine("sqlite://"))
    index.top_up()
    assert index.top_up(not_before=time.monotonic() - 3600) is None  # shared, not repeated
    assert index.top_up(not_before=time.monotonic()) is not None


def test_a_change_within_one_timestamp_tick_is_not_missed(tmp_path: Path) -> None:
    """Two changes in one mtime tick leave the folder's mtime as it was: a folder modified
    just before a scan is listed again at the next one, however its mtime looks."""
    store = FileStore(tmp_path / "store")
    mr = Path(get_testdata_file("MR_small.dcm"))
    first = put(store, relabelled(mr, tmp_path / "a.dcm"))
    index = StoreIndex(store.root, make_engine("sqlite://"))
    index.top_up()
    folder = first.parent
    tick = folder.stat().st_mtime_ns
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    same = {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID}
    put(store, relabelled(mr, tmp_path / "b.dcm", **same))
    os.utime(folder, ns=(tick, tick))  # as if both renames fell in the same tick
    result = index.top_up()
    assert result is not None and result.read == 1 and index.instances_indexed == 2


def test_an_unreadable_file_is_left_out_and_logged_without_its_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path / "store")
    folder = store.root / "1.2.3" / "1.2.3.4"
    folder.mkdir(parents=True)
    (folder / "1.2.3.4.5.dcm").write_bytes(b"PatientName=Secret^Person " * 10)
    index = StoreIndex(store.root, make_engine("sqlite://"))
    result = index.top_up()
    assert result is not None and result.unreadable == 1 and index.instances_indexed == 0
    logged = "".join(JsonFormatter("console").format(r) for r in caplog.records)
    assert '"SOPInstanceUID": "1.2.3.4.5"' in logged and "Secret" not in logged


def test_an_instance_without_a_study_attribute_does_not_blank_it(tmp_path: Path) -> None:
    from services.console.index import studies

    store = FileStore(tmp_path / "store")
    mr = Path(get_testdata_file("MR_small.dcm"))
    scan = relabelled(mr, tmp_path / "scan.dcm", StudyDescription="MRI BRAIN")
    ds = pydicom.dcmread(scan)
    put(store, scan)
    index = StoreIndex(store.root, make_engine(f"sqlite:///{tmp_path / 'index.db'}"))
    index.top_up()
    # A derived instance of the same study (a heatmap, another sender) without the attribute.
    derived = relabelled(mr, tmp_path / "derived.dcm", StudyInstanceUID=ds.StudyInstanceUID)
    assert "StudyDescription" not in pydicom.dcmread(derived, stop_before_pixels=True)
    put(store, derived)
    assert index.top_up().read == 1  # type: ignore[union-attr]
    with index.engine.connect() as conn:
        described = conn.execute(select(studies.c.StudyDescription)).scalars().all()
    assert described == ["MRI BRAIN"]
