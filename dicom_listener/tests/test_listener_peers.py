"""The dcmtk wrappers' command lines (no network)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from devtools import peers
from devtools.kafka_local import free_port
from devtools.peers import PeerError, storescu, storescu_command_line


def test_command_line_for_a_folder_scans_it_recursively(tmp_path: Path) -> None:
    folder = tmp_path / "my study"
    folder.mkdir()
    line = storescu_command_line(folder, "10.0.0.5", 104, called_ae="PACS")
    assert line.startswith("TCP_NODELAY=1 storescu ")
    argv = shlex.split(line.removeprefix("TCP_NODELAY=1 "))
    assert argv[1:3] == ["-aec", "PACS"]
    assert argv[-5:] == ["+sd", "+r", "10.0.0.5", "104", str(folder)]


def test_command_line_for_files_lists_them(tmp_path: Path) -> None:
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    argv = shlex.split(storescu_command_line(files, "h", 11112).removeprefix("TCP_NODELAY=1 "))
    assert argv[:5] == ["storescu", "-aec", "SCANWATCH", "-aet", "STORESCU"]
    assert argv[-4:] == ["h", "11112", str(files[0]), str(files[1])]
    assert "+sd" not in argv


def test_long_file_lists_are_split_into_several_associations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peers, "MAX_ARGS_CHARS", 25)
    chunks = list(peers._chunks([f"/f/{n:04d}.dcm" for n in range(5)]))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [p for c in chunks for p in c] == [f"/f/{n:04d}.dcm" for n in range(5)]


def test_storescu_to_nobody_raises_with_dcmtk_message(mr_series: list[Path]) -> None:
    with pytest.raises(PeerError, match="Connection refused"):
        storescu(mr_series[:1], "127.0.0.1", free_port(), timeout=2)
