"""The file store's layout (scanwatch.store_layout): one grammar the listener writes, the
console's index reads and the worker writes its heatmap series into."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_listener.adapters.filestore import FileStore
from scanwatch import store_layout
from services.console import index

SOP = "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize("version", [1, 2, 10])
def test_names_round_trip(version: int) -> None:
    name = store_layout.instance_file_name(SOP, version)
    assert store_layout.parse_file_name(name) == (SOP, version)
    assert name == (f"{SOP}.dcm" if version == 1 else f"{SOP}.v{version}.dcm")


@pytest.mark.parametrize(
    "name",
    ["x.dcm", "1..2.dcm", "1.2.v.dcm", "1.2.dcm.tmp", "../1.dcm", "1.2.v2", "1" * 65 + ".dcm"],
)
def test_other_names_are_not_instances(name: str) -> None:
    assert store_layout.parse_file_name(name) is None


def test_paths_refuse_what_is_not_a_uid(tmp_path: Path) -> None:
    assert store_layout.instance_path(tmp_path, "1.2", "1.3", "1.4", 3) == (
        tmp_path / "1.2" / "1.3" / "1.4.v3.dcm"
    )
    for bad in ("..", "1.2/3", "", "1." * 40):
        with pytest.raises(ValueError, match="not a valid UID"):
            store_layout.instance_path(tmp_path, "1.2", bad, "1.4")


def test_the_listener_and_the_console_use_this_grammar(tmp_path: Path) -> None:
    """One definition: the listener's store and the console's index take it from here."""
    store = FileStore(tmp_path)
    assert store.path_for("1.2", "1.3", SOP, 2) == store_layout.instance_path(
        store.root, "1.2", "1.3", SOP, 2
    )
    assert index.parse_file_name is store_layout.parse_file_name
    assert index.is_uid is store_layout.is_uid
