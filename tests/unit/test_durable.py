"""scanwatch.durable: what each helper fsyncs, and that publishing never shows half a result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scanwatch import durable


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Paths of every descriptor the helpers fsync, in order (fsync itself still runs)."""
    opened: dict[int, Path] = {}
    calls: list[Path] = []
    real_open, real_fsync, real_close = os.open, os.fsync, os.close

    def tracking_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def tracking_fsync(fd: int) -> None:
        calls.append(opened.get(fd, Path(f"<fd {fd}>")))
        real_fsync(fd)

    def tracking_close(fd: int) -> None:
        opened.pop(fd, None)
        real_close(fd)

    monkeypatch.setattr(durable.os, "open", tracking_open)
    monkeypatch.setattr(durable.os, "close", tracking_close)
    monkeypatch.setattr(durable.os, "fsync", tracking_fsync)
    return calls


def make_tree(root: Path) -> set[Path]:
    (root / "variables").mkdir(parents=True)
    (root / "assets" / "deep").mkdir(parents=True)
    for relative in ("saved_model.pb", "variables/variables.index", "assets/deep/vocab.txt"):
        (root / relative).write_bytes(relative.encode())
    return {p for p in root.rglob("*")} | {root}


def test_fsync_dir_fsyncs_the_folder(tmp_path: Path, fsynced: list[Path]) -> None:
    durable.fsync_dir(tmp_path)
    assert fsynced == [tmp_path]


def test_fsync_dir_refuses_a_file(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        durable.fsync_dir(file)


def test_fsync_tree_fsyncs_every_file_and_every_folder(tmp_path: Path, fsynced: list[Path]) -> None:
    root = tmp_path / "model"
    everything = make_tree(root)
    durable.fsync_tree(root)
    assert set(fsynced) == everything  # sub-folders too, not only the root
    assert len(fsynced) == len(everything)


def test_write_bytes_atomic_creates_and_replaces(tmp_path: Path, fsynced: list[Path]) -> None:
    path = tmp_path / "state.json"
    durable.write_bytes_atomic(path, b"one")
    assert path.read_bytes() == b"one"
    durable.write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    assert fsynced[-1] == tmp_path  # the folder, after the rename
    assert fsynced.count(tmp_path) == 2


def test_write_bytes_atomic_leaves_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        durable.write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_text_atomic_writes_utf8(tmp_path: Path) -> None:
    durable.write_text_atomic(tmp_path / "r.md", "Ségolène ✓")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "Ségolène ✓"


def test_replace_file_fsyncs_the_file_then_the_folder(tmp_path: Path, fsynced: list[Path]) -> None:
    temp, path = tmp_path / ".tmp-x.h5", tmp_path / "x.h5"
    temp.write_bytes(b"weights")
    path.write_bytes(b"older weights")
    durable.replace_file(temp, path)
    assert path.read_bytes() == b"weights"
    assert not temp.exists()
    assert fsynced == [temp, tmp_path]


def test_publish_dir_fsyncs_the_tree_renames_and_fsyncs_the_parent(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    temp, final = tmp_path / ".tmp-abc", tmp_path / "1"
    written = make_tree(temp)
    durable.publish_dir(temp, final)
    assert not temp.exists()
    assert (final / "assets" / "deep" / "vocab.txt").read_bytes() == b"assets/deep/vocab.txt"
    assert set(fsynced[:-1]) == written  # the whole tree, before the rename
    assert fsynced[-1] == tmp_path  # then the folder that gained the entry


def test_publish_dir_never_replaces_an_existing_folder(tmp_path: Path) -> None:
    temp, final = tmp_path / ".tmp-abc", tmp_path / "1"
    make_tree(temp)
    final.mkdir()
    (final / "saved_model.pb").write_bytes(b"published before")
    with pytest.raises(FileExistsError):
        durable.publish_dir(temp, final)
    assert (final / "saved_model.pb").read_bytes() == b"published before"
    assert temp.is_dir()  # left for the caller to remove


def test_publish_dir_reports_a_race_as_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another publisher renames the same name between the check and our rename."""
    temp, final = tmp_path / ".tmp-abc", tmp_path / "1"
    make_tree(temp)
    real_rename = os.rename

    def rename_after_someone_else(source: Path, target: Path) -> None:
        other = tmp_path / ".tmp-other"
        make_tree(other)
        real_rename(other, target)
        real_rename(source, target)

    monkeypatch.setattr(durable.os, "rename", rename_after_someone_else)
    with pytest.raises(FileExistsError):
        durable.publish_dir(temp, final)
    assert temp.is_dir()


def test_rename_durable_fsyncs_both_folders_when_they_differ(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    staging, served = tmp_path / ".staging", tmp_path / "served"
    (staging / "3").mkdir(parents=True)
    served.mkdir()
    durable.rename_durable(staging / "3", served / "3")
    assert (served / "3").is_dir() and not (staging / "3").exists()
    assert fsynced == [served, staging]


def test_rename_durable_fsyncs_one_folder_when_it_is_the_same(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    (tmp_path / "a").mkdir()
    durable.rename_durable(tmp_path / "a", tmp_path / "b")
    assert fsynced == [tmp_path]


def test_atomic_files_appear_whole_when_the_block_ends(tmp_path: Path, fsynced: list[Path]) -> None:
    with durable.atomic_files(tmp_path) as files:
        files.write("a.dcm", b"first")
        files.write("b.dcm", b"second")
        # Written and fsync'd under hidden names; nothing under the final names yet.
        assert sorted(p.name[:5] for p in tmp_path.iterdir()) == [".tmp-", ".tmp-"]
        assert len(fsynced) == 2 and tmp_path not in fsynced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm", "b.dcm"]
    assert (tmp_path / "b.dcm").read_bytes() == b"second"
    assert fsynced[2:] == [tmp_path]  # then the folder, once for all of them


def test_atomic_files_leave_nothing_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="encoding failed"):
        with durable.atomic_files(tmp_path) as files:
            files.write("a.dcm", b"first")
            raise ValueError("encoding failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_keep_what_was_renamed_when_a_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    renamed: list[str] = []

    def failing_second(source: Path, target: Path) -> None:
        if renamed:
            raise OSError(28, "No space left on device")
        real_replace(source, target)
        renamed.append(Path(target).name)

    monkeypatch.setattr(durable.os, "replace", failing_second)
    with pytest.raises(OSError, match="No space"):
        with durable.atomic_files(tmp_path) as files:
            files.write("a.dcm", b"first")
            files.write("b.dcm", b"second")
    assert [p.name for p in tmp_path.iterdir()] == ["a.dcm"]  # whole; no temporary file left
    assert (tmp_path / "a.dcm").read_bytes() == b"first"
