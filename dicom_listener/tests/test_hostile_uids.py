"""Path traversal: DICOM UIDs become path components of the store, so every UID that is not
digits and dots (PS3.5 9.1, at most 64 characters) is refused before a path is made of it: by
the store layout, by the file store, and by the C-STORE handler with a status that names the
attribute. Nothing is written outside the store root, and no event is recorded.

A component with a leading zero ("1.02.3") breaks PS3.5 9.1 too, but is accepted on purpose:
it is harmless as a path, and old modalities send such UIDs; refusing them would lose studies
(README, "Identifiers").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
import pytest

from dicom_listener.adapters.filestore import FileStore
from dicom_listener.dicom.statuses import (
    CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
    CANNOT_UNDERSTAND_INVALID_UID,
    SUCCESS,
)
from dicom_listener.fuzz.seeds import hostile_uids, mr_small, with_uids
from dicom_listener.handlers import handle_store
from dicom_listener.tests.test_listener_handlers import context, events, store_event
from scanwatch.store_layout import instance_path, is_uid, parse_file_name, series_folder

KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: Refused everywhere; "leading-zero" is the one hostile-looking UID that is accepted.
REFUSED = {name: value for name, value in hostile_uids().items() if name != "leading-zero"}
ESCAPED = Path("/tmp/scanwatch-escaped")


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("value", REFUSED.values(), ids=REFUSED.keys())
def test_the_store_layout_refuses_what_is_not_a_uid(value: str, tmp_path: Path) -> None:
    assert not is_uid(value)
    for study, series, sop in (
        (value, "1.2", "1.3"),
        ("1.2", value, "1.3"),
        ("1.2", "1.3", value),
    ):
        with pytest.raises(ValueError, match="is not a valid UID"):
            instance_path(tmp_path, study, series, sop)
    with pytest.raises(ValueError):
        series_folder(tmp_path, "1.2", value)
    assert parse_file_name(f"{value}.dcm") is None


def test_a_file_name_with_a_trailing_newline_is_not_an_instance() -> None:
    """``$`` in a Python regular expression matches before a final newline: the layout's
    patterns must match whole names (this accepted "1.2.dcm\\n" and the UID "1.2\\n")."""
    assert parse_file_name("1.2.dcm\n") is None
    assert not is_uid("1.2\n")
    assert parse_file_name("1.2.v3.dcm") == ("1.2", 3)


@pytest.mark.parametrize("value", REFUSED.values(), ids=REFUSED.keys())
def test_the_file_store_refuses_it_and_creates_nothing(value: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = FileStore(root)
    tmp = tmp_path / "incoming.tmp"
    tmp.write_bytes(b"x")
    before, around = tree(tmp_path), set(tmp_path.parent.iterdir())
    for uids in ((value, "1.2", "1.3"), ("1.2", value, "1.3"), ("1.2", "1.3", value)):
        with pytest.raises(ValueError, match="is not a valid UID"):
            store.adopt(tmp, *uids, sha256="0" * 64, size=1)
        with pytest.raises(ValueError):
            store.path_for(*uids)
    assert tree(tmp_path) == before
    assert set(tmp_path.parent.iterdir()) == around
    assert not ESCAPED.exists()


@pytest.mark.parametrize("keyword", KEYWORDS)
@pytest.mark.parametrize("value", REFUSED.values(), ids=REFUSED.keys())
def test_the_handler_refuses_it_naming_the_attribute(
    value: str, keyword: str, tmp_path: Path
) -> None:
    ds = mr_small()
    received = store_event(
        with_uids(ds, {keyword: value}), ds.SOPInstanceUID, folder=tmp_path / "incoming"
    )
    if keyword == "SOPInstanceUID":  # the sender's request repeats the dataset's UID
        received = dataclasses.replace(received, affected_sop_instance_uid=value)
    ctx = context(tmp_path)
    before, around = tree(tmp_path), set(tmp_path.parent.iterdir())

    rsp = handle_store(received, ctx)

    assert rsp.Status == CANNOT_UNDERSTAND_INVALID_UID
    assert rsp.ErrorComment == f"{keyword} is not a valid UID"
    assert events(ctx) == []
    added = tree(tmp_path) - before
    # Only the quarantine copy (named without identifiers) and the outbox's own files.
    assert {p.parent.name for p in added if p.is_file()} <= {"quarantine", tmp_path.name}
    assert not any(p.is_relative_to(tmp_path / "store") for p in added if p.is_file())
    assert set(tmp_path.parent.iterdir()) == around
    assert not ESCAPED.exists()


def test_a_request_uid_that_is_no_uid_is_a_mismatch(tmp_path: Path) -> None:
    """The dataset's UIDs are fine; the request's AffectedSOPInstanceUID is a path."""
    ds = mr_small()
    received = dataclasses.replace(
        store_event(with_uids(ds, {}), ds.SOPInstanceUID, folder=tmp_path / "incoming"),
        affected_sop_instance_uid="../../x",
    )
    ctx = context(tmp_path)
    assert handle_store(received, ctx).Status == CANNOT_UNDERSTAND_INSTANCE_MISMATCH
    assert events(ctx) == []


def test_a_leading_zero_is_accepted_and_stored_under_the_datasets_own_uid(
    tmp_path: Path,
) -> None:
    ds = mr_small()
    study = "1.02.3"
    received = store_event(
        with_uids(ds, {"StudyInstanceUID": study}), ds.SOPInstanceUID, folder=tmp_path / "in"
    )
    ctx = context(tmp_path)
    assert handle_store(received, ctx).Status == SUCCESS
    [stored] = [p for p in (tmp_path / "store").rglob("*.dcm")]
    assert stored.relative_to(tmp_path / "store").parts[0] == study
    assert pydicom.dcmread(stored).StudyInstanceUID == study
