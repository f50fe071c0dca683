"""The filesystem instance store: durable, atomic writes of Part 10 files.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. A write goes to
a hidden temporary name in the final folder, is fsync'd, renamed over the final name and the
folder is fsync'd, so that after :meth:`FileStore.put` returns the file survives a power cut and
a reader never sees a partial file. Writing the same instance again replaces it atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

#: A DICOM UID (PS3.5 §9.1). Checked again here because UIDs become path components.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX = 64


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance was written and what its bytes hash to."""

    path: Path
    uri: str
    sha256: str
    size_bytes: int


class InstanceStore(Protocol):
    """Where the listener puts received instances (a folder here; an object store later)."""

    def put(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        """Store ``data`` durably; return only once it would survive a crash, else raise."""
        ...


def _check_uid(name: str, value: str) -> None:
    if len(value) > _UID_MAX or not _UID_RE.match(value):
        raise ValueError(f"{name} is not a valid UID")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Stores Part 10 files under ``root`` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path of an instance; raises ``ValueError`` on a malformed UID."""
        _check_uid("StudyInstanceUID", study_uid)
        _check_uid("SeriesInstanceUID", series_uid)
        _check_uid("SOPInstanceUID", sop_uid)
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` and missing parents, fsync'ing each parent whose entries changed."""
        if folder.is_dir():
            return
        self._ensure_dir(folder.parent)
        try:
            folder.mkdir()
        except FileExistsError:  # another association created it meanwhile
            return
        _fsync_dir(folder.parent)

    def put(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        """Write ``data`` durably as the instance's file; raises ``OSError`` when it cannot."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        self._ensure_dir(final.parent)
        tmp = final.with_name(f".{sop_uid}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return StoredInstance(
            path=final,
            uri=final.as_uri(),
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )
