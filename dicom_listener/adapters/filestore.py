"""The filesystem instance store: durable, atomic placement of Part 10 files.

Layout (:mod:`scanwatch.store_layout`, shared with the console and the worker):
``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; a later version of the
same instance with other content is kept beside it as ``<SOPInstanceUID>.v<N>.dcm`` (UIDs hold
only digits and dots, so the names cannot collide).

The network side streams each dataset, hashing it, to a temporary file in ``<root>/.incoming``
(same filesystem). Placing it is two steps so that the caller can decide, between them, whether
the bytes are new: :meth:`FileStore.adopt` fsyncs the file and creates the instance's folder;
:meth:`FileStore.commit` renames the file to its final name and fsyncs the folder. After
``commit`` returns the file survives a power cut, and a reader never sees a partial file.

The temporary files come from :meth:`FileStore.open_incoming`: empty files made
:data:`READY_BATCH` at a time in ``<root>/.incoming/ready``, their names made durable by one
fsync of that folder. The bytes of such a file are durable under a durable name once
``adopt`` fsyncs them, so its caller may leave out ``commit``'s folder fsync, provided it records
the placement where a restart finds it (the outbox's ``placements``), and have the folder fsync'd
later, for many files at once.

Such a file is also **sealed** before its fsync: an extended attribute (:data:`SEAL_XATTR`)
holds its SHA-256 and the association's AE titles, made durable by the same fsync. A sealed file
can be recorded again on its own: if a power cut takes the outbox transaction that recorded it,
the next start finds it under its durable name, checks its bytes against the seal and records
it again (:meth:`FileStore.unrecorded`). So the outbox's commit need not be flushed before the
C-STORE is answered: one flush per instance, the file's. Its placement is then a hard link, and
the durable name stays until the link and the transaction are durable
(:meth:`~dicom_listener.adapters.outbox.Outbox.settle_placements`). A filesystem without user
extended attributes gets unsealed files and flushed commits.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from scanwatch.durable import fsync_dir
from scanwatch.store_layout import check_uid, instance_file_name

log = logging.getLogger(__name__)

#: Bytes copied per read when streaming an instance to disk.
CHUNK_BYTES = 1024 * 1024
#: Empty incoming files made at a time, with one fsync of their folder.
READY_BATCH = 32
#: The extended attribute that seals a received file (a short name: with its value it fits
#: inside an ext4 inode, so writing it costs no block of its own).
SEAL_XATTR = "user.sw.seal"
_AE_BYTES = 16


@dataclass(frozen=True)
class Seal:
    """What a restart needs to record a received file again: its SHA-256 (which also proves
    that the bytes are whole) and the AE titles of the association that sent it."""

    sha256: str
    calling_ae_title: str
    called_ae_title: str

    def encode(self) -> bytes:
        aes = (self.calling_ae_title, self.called_ae_title)
        return bytes.fromhex(self.sha256) + b"".join(
            ae.encode("ascii", "replace")[:_AE_BYTES].ljust(_AE_BYTES) for ae in aes
        )

    @classmethod
    def decode(cls, value: bytes) -> Seal | None:
        """The seal ``value`` encodes, or None when it is not one."""
        if len(value) != 32 + 2 * _AE_BYTES:
            return None
        calling, called = value[32 : 32 + _AE_BYTES], value[32 + _AE_BYTES :]
        calling_ae, called_ae = (ae.decode("ascii", "replace").strip() for ae in (calling, called))
        return cls(value[:32].hex(), calling_ae, called_ae)


@dataclass(frozen=True)
class StagedInstance:
    """Bytes fsync'd under a temporary name, not yet visible."""

    tmp: Path
    folder: Path
    sop_uid: str
    sha256: str
    size_bytes: int
    #: ``tmp``'s name is durable (a file of :meth:`FileStore.open_incoming`).
    name_durable: bool = False
    #: ``tmp`` carries a durable :class:`Seal`: a restart records it again if its commit is lost.
    sealed: bool = False


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance was written and what its bytes hash to."""

    path: Path
    uri: str
    sha256: str
    size_bytes: int


class InstanceStore(Protocol):
    """Where the listener puts received instances (a folder here; an object store later)."""

    def open_incoming(self) -> tuple[Path, int]:
        """A new file for a dataset being received, and a descriptor open for writing."""
        ...

    def adopt(
        self,
        path: Path,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sha256: str,
        size: int,
        fd: int = -1,
        seal: Seal | None = None,
    ) -> StagedInstance:
        """Stage a file already written on the store's filesystem: seal it (when ``seal`` is
        given and the store can), fsync it (through ``fd`` when it is open; no copy) and create
        its folder."""
        ...

    def uri_for(self, staged: StagedInstance, version: int) -> str:
        """Where :meth:`commit` will put ``version`` of the staged bytes."""
        ...

    def holds(self, uri: str) -> bool:
        """Whether the object at ``uri`` (one :meth:`uri_for` gave) is in the store."""
        ...

    def commit(
        self, staged: StagedInstance, version: int, fsync_folder: bool = True
    ) -> StoredInstance:
        """Make the staged bytes the instance's ``version``; durable once this returns, or
        once the caller fsync'd ``staged.folder`` when ``fsync_folder`` is False."""
        ...

    def discard(self, staged: StagedInstance) -> None:
        """Drop staged bytes that are not needed (a duplicate, a failure)."""
        ...


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _seal(fd: int, seal: Seal) -> bool:
    """Write ``seal`` on the open file; False where the filesystem has no user xattrs."""
    try:
        os.setxattr(fd, SEAL_XATTR, seal.encode())
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        return False
    return True


def _link_over(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``, replacing a file there (one that no index row names:
    left by a C-STORE never answered, or by a power cut that took its commit)."""
    try:
        os.link(source, target)
    except FileExistsError:
        target.unlink()
        os.link(source, target)


def read_chunks(fp: BinaryIO, size: int = CHUNK_BYTES) -> Iterable[bytes]:
    """The rest of ``fp`` in chunks of at most ``size`` bytes."""
    while chunk := fp.read(size):
        yield chunk


class FileStore:
    """Stores Part 10 files under ``root`` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        #: Where the network side streams datasets before they are identified and adopted
        #: (same filesystem, so adopting is a rename).
        self.incoming = self.root / ".incoming"
        #: Empty files whose names are durable, for :meth:`open_incoming`.
        self.ready = self.incoming / "ready"
        self._ready: list[Path] = []
        self._ready_lock = threading.Lock()
        self._refilling = False

    def open_incoming(self) -> tuple[Path, int]:
        """A file for a dataset about to be received, and a descriptor open for writing: one
        of the empty files whose names were made durable ahead of time. Raises ``OSError``.

        The next batch is made on a thread of its own when half of this one is used: creating
        a file waits for the filesystem's journal, which the C-STORE need not do."""
        with self._ready_lock:
            if not self._ready:
                self._ready.extend(self._make_ready())
            path = self._ready.pop()
            if len(self._ready) < READY_BATCH // 2 and not self._refilling:
                self._refilling = True
                threading.Thread(target=self._refill, name="incoming-files", daemon=True).start()
        return path, os.open(path, os.O_WRONLY)

    def _refill(self) -> None:
        batch: list[Path] = []
        try:
            batch = self._make_ready()
        except OSError as exc:  # the C-STORE that finds none left makes its own (or fails)
            log.warning("incoming files not made ready: %r", exc)
        with self._ready_lock:
            self._ready.extend(batch)
            self._refilling = False

    def _make_ready(self) -> list[Path]:
        self._ensure_dir(self.ready)
        batch = [self.ready / f"{uuid.uuid4().hex}.tmp" for _ in range(READY_BATCH)]
        for path in batch:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        fsync_dir(self.ready)
        return batch

    def folder_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The folder of an instance; raises ``ValueError`` on a malformed UID."""
        check_uid("StudyInstanceUID", study_uid)
        check_uid("SeriesInstanceUID", series_uid)
        check_uid("SOPInstanceUID", sop_uid)
        return self.root / study_uid / series_uid

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str, version: int = 1) -> Path:
        """The final path of one version of an instance."""
        return self.folder_for(study_uid, series_uid, sop_uid) / instance_file_name(
            sop_uid, version
        )

    def _ensure_dir(self, folder: Path) -> None:
        """Create ``folder`` and missing parents, fsync'ing each parent whose entries changed."""
        if folder.is_dir():
            return
        self._ensure_dir(folder.parent)
        try:
            folder.mkdir()
        except FileExistsError:  # another association created it meanwhile
            return
        fsync_dir(folder.parent)

    def adopt(
        self,
        path: Path,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sha256: str,
        size: int,
        fd: int = -1,
        seal: Seal | None = None,
    ) -> StagedInstance:
        folder = self.folder_for(study_uid, series_uid, sop_uid)
        path = Path(path)
        name_durable = path.parent == self.ready
        own = fd < 0
        if own:
            fd = os.open(path, os.O_RDONLY)
        try:
            sealed = name_durable and seal is not None and _seal(fd, seal)
            os.fsync(fd)
        finally:
            if own:
                os.close(fd)
        self._ensure_dir(folder)
        return StagedInstance(path, folder, sop_uid, sha256, size, name_durable, sealed)

    @staticmethod
    def _final_path(staged: StagedInstance, version: int) -> Path:
        return staged.folder / instance_file_name(staged.sop_uid, version)

    def uri_for(self, staged: StagedInstance, version: int) -> str:
        return self._final_path(staged, version).as_uri()

    def holds(self, uri: str) -> bool:
        parsed = urlparse(uri)
        path = Path(url2pathname(parsed.path))
        return parsed.scheme == "file" and path.is_relative_to(self.root) and path.is_file()

    def commit(
        self, staged: StagedInstance, version: int, fsync_folder: bool = True
    ) -> StoredInstance:
        """A file with a durable name is linked into place and keeps that name until its caller
        made the link durable (the outbox's placements); any other file is renamed."""
        final = self._final_path(staged, version)
        try:
            if staged.name_durable:
                _link_over(staged.tmp, final)
            else:
                os.replace(staged.tmp, final)
        except BaseException:
            staged.tmp.unlink(missing_ok=True)
            raise
        if fsync_folder:
            fsync_dir(staged.folder)
        return StoredInstance(
            path=final, uri=final.as_uri(), sha256=staged.sha256, size_bytes=staged.size_bytes
        )

    def discard(self, staged: StagedInstance) -> None:
        staged.tmp.unlink(missing_ok=True)

    def unrecorded(self) -> Iterator[tuple[Path, Seal]]:
        """Files under their durable incoming names whose seal matches their bytes.

        At start-up, once the outbox finished its placements, such a file was accepted and its
        outbox transaction is gone (a power cut took the unflushed commit), or its C-STORE failed
        or was cut off after the seal: recording it is right in every case (a duplicate is known
        by its SHA-256). A file whose bytes differ from its seal was never answered; the sweep
        removes it."""
        for path in sorted(self.ready.glob("*.tmp")) if self.ready.is_dir() else []:
            try:
                seal = Seal.decode(os.getxattr(path, SEAL_XATTR))
            except OSError:  # not sealed (never accepted), or no xattrs here
                continue
            if seal is None:
                continue
            with open(path, "rb") as fp:
                whole = hashlib.file_digest(fp, "sha256").hexdigest() == seal.sha256
            if whole:
                yield path, seal

    def second_name(self, path: Path) -> Path:
        """Another incoming name for the file ``path`` (a hard link, not made durable)."""
        second = self.ready / f"{uuid.uuid4().hex}.tmp"
        os.link(path, second)
        return second

    def sweep_temporaries(self) -> int:
        """Remove temporary files a killed process left behind; return how many held bytes.

        Only safe at start-up, before associations are served, and after the outbox finished
        its placements (:meth:`Outbox.open`): a temporary file then belongs to a C-STORE that
        was never answered with success, so its sender will send it again.
        """
        if not self.root.is_dir():
            return 0
        count = 0
        for tmp in (*self.incoming.glob("*.tmp"), *self.ready.glob("*.tmp")):
            count += tmp.stat().st_size > 0  # a ready file never written is not worth a word
            tmp.unlink(missing_ok=True)
        return count


class Quarantine:
    """Keeps a copy of refused input for inspection: ``<dir>/<UTC time>-<reason>-<id>.dcm``.

    Names hold no UIDs or other identifiers from the (untrusted) dataset.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()

    def keep(self, reason: str, chunks: Iterable[bytes]) -> Path:
        """Write ``chunks`` under a new name; return it. Raises ``OSError`` when it cannot."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.folder / f"{stamp}-{reason}-{uuid.uuid4().hex[:12]}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path
