"""The durable outbox and instance index, in one SQLite database (WAL, ``synchronous=NORMAL``
and explicit flushes).

The C-STORE handler records an instance and its event in one transaction
(:meth:`Outbox.submit`): when that commit returns, both are durable, so success can be answered
whether or not Kafka is up. Durable means one of two things. A commit is flushed (its WAL
fsync'd, :meth:`Outbox.sync`) before it returns, unless every C-STORE in it received a *sealed*
file (:mod:`dicom_listener.adapters.filestore`): a power cut that takes such a commit leaves the
file, which the next start records again. Events are flushed before the publisher sends them,
and placements before their files lose their durable names, so nothing that left this database
is ever undone. The publisher (:mod:`dicom_listener.adapters.publisher`) reads the
events in sequence order, sends them, and deletes them once Kafka acknowledged them.

``placements`` lists files linked into the store whose new name may not be durable yet: a file
received under a name already durable (:meth:`FileStore.open_incoming`) is linked into place in
the transaction without an fsync of its folder, which would be a second flush per C-STORE.
:class:`PlacementSettler` flushes the WAL, fsyncs those folders in batches, off the C-STORE
path, removes the durable incoming names and forgets the rows; after a crash,
:meth:`Outbox.open` links any file whose new name was lost again.

``instances`` remembers the SHA-256 and version of every SOPInstanceUID stored, which is how a
duplicate send (same bytes: no second event) is told from a new version (other bytes).
Several listener processes may share one database: SQLite serialises the writers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from scanwatch.durable import fsync_dir

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Most C-STOREs committed together in one group commit.
GROUP_COMMIT_MAX = 64
#: Longest a group commit waits for announced C-STOREs (:meth:`Outbox.announce`) to join it.
#: About the time to fsync a typical instance: waiting saves the next batch's two fsyncs.
GROUP_COMMIT_WAIT_S = 0.002

#: How often :class:`PlacementSettler` makes the names of placed files durable.
SETTLE_INTERVAL_S = 0.25

#: How long a writer waits for another process's transaction before failing.
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    SOPInstanceUID TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    version INTEGER NOT NULL,
    storage_uri TEXT NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS procedure_steps (
    uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    staged TEXT NOT NULL,
    final TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    headers TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class KnownInstance:
    """What the index holds about an instance already stored."""

    sha256: str
    version: int
    storage_uri: str


@dataclass(frozen=True)
class ProcedureStep:
    """A Modality Performed Procedure Step as last created or set (``dataset``: DICOM JSON)."""

    uid: str
    status: str
    dataset: str
    calling_ae_title: str


@dataclass(frozen=True)
class OutboxEvent:
    """One event waiting for Kafka's acknowledgement."""

    seq: int
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    created_at: float


class OutboxTransaction:
    """The handler's view of one write transaction: look up, then record.

    In a group commit, folders registered with :meth:`fsync_folder_before_commit` are fsync'd
    once each before the commit, and :meth:`on_rollback` callbacks run when the commit fails.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.folders: set[Path] = set()
        self.undo: list[Callable[[], None]] = []
        #: The commit must be flushed before it returns: a request in it did not call
        #: :meth:`rebuildable`.
        self.flush = False
        self._rebuildable = False

    def rebuildable(self) -> None:
        """Say that what this request recorded can be rebuilt after a power cut (from a sealed
        file), so that its commit need not be flushed before it returns. Without this call a
        request's commit is flushed."""
        self._rebuildable = True

    def fsync_folder_before_commit(self, folder: Path) -> None:
        self.folders.add(folder)

    def place_later(self, staged: Path, final: Path) -> None:
        """Record that the file named ``staged`` (a durable name) was linked as ``final``,
        whose folder is not fsync'd yet: the link is redone after a crash that lost it."""
        self._conn.execute(
            "INSERT INTO placements (staged, final) VALUES (?, ?)", (str(staged), str(final))
        )

    def on_rollback(self, callback: Callable[[], None]) -> None:
        self.undo.append(callback)

    def known(self, sop_uid: str) -> KnownInstance | None:
        row = self._conn.execute(
            "SELECT sha256, version, storage_uri FROM instances WHERE SOPInstanceUID = ?",
            (sop_uid,),
        ).fetchone()
        return KnownInstance(*row) if row else None

    def record(
        self,
        sop_uid: str,
        sha256: str,
        version: int,
        storage_uri: str,
        *,
        topic: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        now = time.time()
        self._conn.execute(
            "INSERT INTO instances (SOPInstanceUID, sha256, version, storage_uri, stored_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (SOPInstanceUID) DO UPDATE SET "
            "sha256 = excluded.sha256, version = excluded.version, "
            "storage_uri = excluded.storage_uri, stored_at = excluded.stored_at",
            (sop_uid, sha256, version, storage_uri, now),
        )
        self.emit(topic, key, value, headers, now)

    def emit(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
        now: float | None = None,
    ) -> None:
        """Record an event, to be published once the transaction commits."""
        encoded = json.dumps([[k, v.decode("latin-1")] for k, v in headers]) if headers else "[]"
        self._conn.execute(
            "INSERT INTO outbox (topic, key, value, headers, created_at) VALUES (?, ?, ?, ?, ?)",
            (topic, key, value, encoded, time.time() if now is None else now),
        )

    def procedure_step(self, uid: str) -> ProcedureStep | None:
        row = self._conn.execute(
            "SELECT uid, status, dataset, calling_ae_title FROM procedure_steps WHERE uid = ?",
            (uid,),
        ).fetchone()
        return ProcedureStep(*row) if row else None

    def save_procedure_step(self, step: ProcedureStep) -> None:
        """Create or replace a procedure step's record."""
        now = time.time()
        self._conn.execute(
            "INSERT INTO procedure_steps (uid, status, dataset, calling_ae_title, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO UPDATE SET "
            "status = excluded.status, dataset = excluded.dataset, "
            "updated_at = excluded.updated_at",
            (step.uid, step.status, step.dataset, step.calling_ae_title, now, now),
        )


@dataclass
class _Request:
    work: Callable[[OutboxTransaction], Any]
    future: Future[Any] = field(default_factory=Future)


class Arrival:
    """A C-STORE announced to the group commit (:meth:`Outbox.announce`); it stops counting
    when it is submitted or withdrawn, whichever comes first."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._pending = True

    def withdraw(self) -> None:
        if self._pending:
            self._pending = False
            self._outbox._arrived()


class Outbox:
    """The database file; thread-safe (one connection per thread).

    :meth:`submit` is the C-STORE path: the work of all C-STOREs waiting at one moment runs in
    one transaction (each in its own savepoint) and is committed once, so concurrent
    associations share the fsyncs instead of queueing on SQLite's write lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._listeners: list[Callable[[], None]] = []
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._leader = threading.Lock()
        self._lock_fd: int | None = None
        #: C-STOREs announced but not yet submitted, and the condition a leader waits on.
        self._announced = 0
        self._arrivals = threading.Condition()

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """An exclusive lock on ``<outbox>.lock`` around each write transaction.

        SQLite's own busy handler waits with growing sleeps (1, 2, 5 ... 100 ms) when another
        process holds the write lock; ``flock`` wakes the next writer as soon as the lock is
        free, which is what keeps several worker processes from stalling each other.
        """
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit does not fsync the WAL; those that must survive a power cut are
            # flushed by :meth:`sync` (the module's docstring says which).
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.executescript(_SCHEMA)
            self._local.conn = conn
        return conn

    def open(self) -> None:
        """Create the database if needed (fails early on an unusable path), and finish the
        placements a crash may have left (their renames redone, their folders fsync'd)."""
        conn = self._connect()
        with self._write_lock():  # one process redoes them; the others find them done
            for _id, staged, final in self._placements(conn):
                if not Path(final).exists():
                    try:
                        os.link(staged, final)
                    except FileNotFoundError:
                        log.error("placed file missing under both names", extra={"id": _id})
                        continue
                    log.warning("placement redone after a crash", extra={"id": _id})
        self.settle_placements()

    @staticmethod
    def _placements(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
        return conn.execute("SELECT id, staged, final FROM placements ORDER BY id").fetchall()

    def sync(self) -> None:
        """Flush every commit made so far, by any connection or process (fsync the WAL)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:  # checkpointed and removed: the checkpoint flushed it
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def settle_placements(self) -> int:
        """Make placed files durable under their new names alone: flush the commits that
        recorded them, fsync each folder a file was linked into, remove the durable incoming
        names, then forget those rows; return how many."""
        conn = self._connect()
        rows = self._placements(conn)
        if not rows:
            return 0
        self.sync()
        for folder in {Path(final).parent for _id, _staged, final in rows}:
            with suppress(FileNotFoundError):  # its study was removed meanwhile
                fsync_dir(folder)
        for _id, staged, _final in rows:
            Path(staged).unlink(missing_ok=True)
        # A delete lost in a power cut only settles those rows again.
        self._write_without_fsync(conn, "DELETE FROM placements WHERE id <= ?", [(rows[-1][0],)])
        return len(rows)

    def _write_without_fsync(
        self, conn: sqlite3.Connection, sql: str, params: list[tuple[Any, ...]]
    ) -> None:
        """One write transaction, not flushed (for writes a power cut may undo harmlessly),
        under a short lock so that C-STORE commits barely wait."""
        with self._write_lock():
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, params)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each committed :meth:`transaction` (wakes the publisher)."""
        self._listeners.append(listener)

    @contextmanager
    def transaction(self) -> Iterator[OutboxTransaction]:
        """An immediate (write-locked) transaction, committed and flushed on normal exit."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield OutboxTransaction(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.sync()
        for listener in self._listeners:
            listener()

    def announce(self) -> Arrival:
        """Say that a C-STORE will :meth:`submit` soon (it is identifying and fsyncing its
        file); withdraw the :class:`Arrival` if it will not."""
        with self._arrivals:
            self._announced += 1
        return Arrival(self)

    def _arrived(self) -> None:
        with self._arrivals:
            self._announced -= 1
            self._arrivals.notify_all()

    def _wait_for_arrivals(self) -> None:
        """Leader: wait up to GROUP_COMMIT_WAIT_S while announced requests are on their way."""
        deadline = time.monotonic() + GROUP_COMMIT_WAIT_S
        with self._arrivals:
            while self._announced > 0 and self._requests.qsize() < GROUP_COMMIT_MAX:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._arrivals.wait(left)

    def submit(self, work: Callable[[OutboxTransaction], T], arrival: Arrival | None = None) -> T:
        """Run ``work`` in a (group) write transaction; return its result once committed
        durably (flushed, unless every request was :meth:`OutboxTransaction.rebuildable`).
        Raises what ``work`` raised (its savepoint is rolled back) or the commit's error.
        ``arrival``: this request's announcement, if it made one.

        Group commit without a thread hand-off: the caller that gets the leader lock waits
        briefly for announced requests, then commits every request waiting at that moment
        (its own included) in one transaction; the others find theirs done when they get the
        lock, or lead the next batch.
        """
        request = _Request(work)
        self._requests.put(request)
        if arrival is not None:
            arrival.withdraw()  # queued: a leader no longer needs to wait for it
        while not request.future.done():
            with self._leader:
                if request.future.done():
                    break
                self._wait_for_arrivals()
                batch: list[_Request] = []
                while len(batch) < GROUP_COMMIT_MAX:
                    try:
                        batch.append(self._requests.get_nowait())
                    except queue.Empty:
                        break
                if batch:
                    self._commit_batch(batch)
        return request.future.result()

    def _commit_batch(self, batch: list[_Request]) -> None:
        results: list[tuple[_Request, Any, BaseException | None]] = []
        tx: OutboxTransaction | None = None
        try:
            conn = self._connect()
            tx = OutboxTransaction(conn)
            with self._write_lock():
                self._run_batch(conn, tx, batch, results)
        except BaseException as exc:  # noqa: BLE001 - nothing of the batch is committed
            for callback in tx.undo if tx is not None else []:
                try:
                    callback()
                except OSError:
                    pass
            for request in batch:
                request.future.set_exception(exc)
            return
        for listener in self._listeners:
            listener()
        for request, result, error in results:
            if error is None:
                request.future.set_result(result)
            else:
                request.future.set_exception(error)

    def _run_batch(
        self,
        conn: sqlite3.Connection,
        tx: OutboxTransaction,
        batch: list[_Request],
        results: list[tuple[_Request, Any, BaseException | None]],
    ) -> None:
        """One transaction, a savepoint per request, folders fsync'd, one commit."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for request in batch:
                conn.execute("SAVEPOINT cstore")
                undo_mark = len(tx.undo)
                tx._rebuildable = False
                try:
                    result = request.work(tx)
                    tx.flush |= not tx._rebuildable
                except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                    conn.execute("ROLLBACK TO cstore")
                    for callback in tx.undo[undo_mark:]:
                        callback()
                    del tx.undo[undo_mark:]
                    results.append((request, None, exc))
                else:
                    results.append((request, result, None))
                conn.execute("RELEASE cstore")
            for folder in tx.folders:
                fsync_dir(folder)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if tx.flush:
            self.sync()

    def stored(self, sop_uids: list[str]) -> dict[str, str]:
        """SOPInstanceUID → storage URI of those of ``sop_uids`` whose instance and event were
        committed (the latest version); those commits are flushed before this returns."""
        found: dict[str, str] = {}
        conn = self._connect()
        for start in range(0, len(sop_uids), 500):  # SQLite's bound-parameter limit
            chunk = sop_uids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT SOPInstanceUID, storage_uri FROM instances "  # noqa: S608 - marks only
                f"WHERE SOPInstanceUID IN ({marks})",
                chunk,
            )
            found.update(rows.fetchall())
        if found:
            self.sync()
        return found

    def pending(self, limit: int) -> list[OutboxEvent]:
        """The oldest ``limit`` undelivered events, in sequence order."""
        rows = (
            self._connect()
            .execute(
                "SELECT seq, topic, key, value, headers, created_at FROM outbox "
                "ORDER BY seq LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [
            OutboxEvent(
                seq,
                topic,
                bytes(key),
                bytes(value),
                [(k, v.encode("latin-1")) for k, v in json.loads(headers)],
                created_at,
            )
            for seq, topic, key, value, headers, created_at in rows
        ]

    def delivered(self, seqs: list[int]) -> None:
        """Forget events Kafka acknowledged."""
        if not seqs:
            return
        # A delete lost in a power cut only sends its event again (delivery is at least once).
        self._write_without_fsync(
            self._connect(), "DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs]
        )

    def depth(self) -> int:
        """Number of undelivered events (an upper bound, read from the rowid index in
        O(log n): events are delivered oldest first, so the pending ones are nearly contiguous)."""
        row = self._connect().execute("SELECT max(seq) - min(seq) + 1 FROM outbox").fetchone()
        return int(row[0] or 0)

    def release_connection(self) -> None:
        """Close the calling thread's connection, when it has one (an association's thread
        that is about to end: a connection left to the garbage collector kept the database,
        its WAL and shared-memory files open, three descriptors per association served)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close this thread's connection and the write lock's file."""
        self.release_connection()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class PlacementSettler:
    """A thread that settles the outbox's placements (:meth:`Outbox.settle_placements`) every
    ``interval_s``, so that one folder fsync serves every file placed in it meanwhile."""

    def __init__(self, outbox: Outbox, interval_s: float = SETTLE_INTERVAL_S) -> None:
        self.outbox = outbox
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; return once it holds its outbox connection (opened once, kept)."""
        connected = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(connected,), name="placement-settler", daemon=True
        )
        self._thread.start()
        connected.wait()

    def _run(self, connected: threading.Event) -> None:
        try:
            self._settle()
        finally:
            connected.set()  # start() never waits on a thread that died
        while not self._stop.wait(self.interval_s):
            self._settle()
        self._settle()
        self.outbox.release_connection()

    def _settle(self) -> None:
        try:
            self.outbox.settle_placements()
        except (OSError, sqlite3.Error) as exc:  # tried again next time; nothing is lost
            log.warning("placements not settled: %r", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
