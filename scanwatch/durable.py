"""Durable writes: a file or a folder appears under its final name complete, and stays there.

A rename is atomic, but it is not durable by itself: after a power cut, the new name can point
at a file whose data never reached the disk, or the rename itself can be lost. The recipe used
everywhere in scanwatch is therefore: write under a temporary name in the destination folder,
fsync the data (every file and every folder of a tree), rename, then fsync the folder that
holds the new entry.

Used by the listener's file store and outbox (the folder fsync only: their hot path makes its
own system calls), by training's export, registry and default model, and by the model server's
OpenVINO cache. POSIX only (folders are opened with ``O_DIRECTORY`` to be fsync'd).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Prefix of the temporary files :func:`write_bytes_atomic` writes (hidden, and no integer).
_TEMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of folder ``path`` durable (names created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make the data of file ``path`` durable (not its name: see :func:`fsync_dir`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Make every file and every folder under ``root`` (``root`` included) durable."""
    for folder, _dirs, files in os.walk(root):
        for file in files:
            fsync_file(os.path.join(folder, file))
        fsync_dir(folder)


def rename_durable(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename ``source`` to ``target`` (same filesystem) and make the rename durable.

    Fsyncs the folder that gained the entry and, when it differs, the one that lost it. The
    contents are not fsync'd here: they must already be durable (see :func:`publish_dir`).
    """
    source, target = Path(source), Path(target)
    os.rename(source, target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)


def replace_file(temp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Move a fully written file ``temp`` over ``path`` durably: fsync, replace, fsync the folder.

    ``path`` is replaced if it exists; a reader sees either the old file or the new one, whole.
    """
    fsync_file(temp)
    os.replace(temp, path)
    fsync_dir(Path(path).parent)


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` written and fsync'd under a new temporary name beside ``path`` (removed again if
    that fails); the caller renames it."""
    temp = path.with_name(f"{_TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(temp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing, durably (temporary file, fsync, replace, fsync
    the folder). ``path``'s folder must exist; the temporary file is removed on failure."""
    path = Path(path)
    temp = _write_temp(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class AtomicFiles:
    """Files being written into one folder by :func:`atomic_files`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def write(self, name: str, data: bytes) -> None:
        """Write file ``name`` of the folder, durably, under a temporary name: it appears under
        its own name when the batch ends."""
        path = self.folder / name
        self._pending.append((_write_temp(path, data), path))

    def _publish(self) -> None:
        pending, self._pending = self._pending, []
        for index, (temp, path) in enumerate(pending):
            try:
                os.replace(temp, path)
            except BaseException:
                self._pending = pending[index:]  # not renamed: removed by _discard
                raise
        fsync_dir(self.folder)

    def _discard(self) -> None:
        for temp, _path in self._pending:
            temp.unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def atomic_files(folder: str | os.PathLike[str]) -> Iterator[AtomicFiles]:
    """:func:`write_bytes_atomic` for many files of one folder, with one folder fsync for all
    of them instead of one each.

    Each file is written and fsync'd under a temporary name as it is given
    (:meth:`AtomicFiles.write`); when the block ends, every one is renamed to its own name and
    the folder is fsync'd once. A name therefore never shows a file whose data is not on disk:
    a crash can lose renames that the folder's fsync had not made durable yet (those files are
    then absent, never half-written), or leave temporary files (hidden names). If the block
    raises, the temporary files are removed and nothing is renamed.
    """
    files = AtomicFiles(Path(folder))
    try:
        yield files
        files._publish()
    finally:
        files._discard()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def publish_dir(temp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """Publish the fully written folder ``temp_dir`` as ``final_dir``, never half of it.

    Fsyncs the whole tree, renames it (atomic on one filesystem: readers see nothing, then all
    of it) and fsyncs the parent folder. An existing ``final_dir`` is never replaced:
    :class:`FileExistsError`, and ``temp_dir`` is left for the caller to remove.
    """
    temp_dir, final_dir = Path(temp_dir), Path(final_dir)
    fsync_tree(temp_dir)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; it is never overwritten")
    try:
        rename_durable(temp_dir, final_dir)
    except OSError as error:
        # rename(2) over a non-empty folder: someone published the same name in between.
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"{final_dir} already exists; it is never overwritten") from error
        raise
