"""Where conversations are kept: Rasa's SQL tracker store, in the project's database (SQLite in
development, PostgreSQL in production), with two changes for PHI.

- The patient's access token never reaches the database: the patient channel puts it in each
  message's metadata for the action server, and :meth:`PatientTrackerStore._additional_events`
  stores a copy of the message without it.
- Conversations are kept ``retention_days`` (events older than that are deleted when the Rasa
  server starts, and by the purge command).
- The trackers of recent conversations are kept in memory (:data:`CACHED_CONVERSATIONS`), so
  that a message does not read and replay its whole conversation from the database: Rasa's
  ``retrieve`` was a fifth of its time per message. A cached tracker is used only while the
  database holds exactly the events it was saved with (one ``COUNT`` per message), so another
  Rasa replica's writes, or a purge, make it read from the database again. A tracker in which a
  new session started is not kept: read again, it holds that session only, as Rasa's own
  ``retrieve`` gives it (and as much is sent to the action server with each action). Saving a cached
  tracker appends the events after those it was cached with, without counting the stored ones
  again: the lock store (``connectors/lock_store.py``) lets one message per conversation through
  at a time, in every process.
- SQLite keeps its connections open (a pool) instead of opening, configuring (write-ahead log)
  and closing one per query, as SQLAlchemy 1.4 does for a database file: that was a tenth of the
  Rasa server's time per message (py-spy, bench/chatbot.py).

The purge command::

      .venv-rasa/bin/python -m connectors.tracker_store purge   # cwd chatbot/, env as below

endpoints.yml configures it from the environment: ``SCANWATCH_CHAT_DB_URL`` (an SQLAlchemy URL:
``sqlite:////abs/path/conversations.db`` or ``postgresql://user:password@host:5432/chat``) and
``SCANWATCH_CHAT_RETENTION_DAYS``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from rasa.core.tracker_store import SQLTrackerStore
from rasa.shared.core.constants import SESSION_START_METADATA_SLOT
from rasa.shared.core.events import Event, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

log = logging.getLogger(__name__)

#: Message metadata that is never stored (the bearer token the channel verified).
UNSTORED_METADATA = ("access_token",)
DEFAULT_RETENTION_DAYS = 30
DAY_S = 86_400
#: Conversations whose tracker is kept in memory (least recently used dropped first), and the
#: most events a cached tracker may hold before it is read again (the latest session only).
CACHED_CONVERSATIONS = 1000
MAX_CACHED_EVENTS = 400
#: SQLite connections kept open (about the threads that save and read at once).
SQLITE_POOL_SIZE = 8


def without_secrets(event: Event) -> Event:
    """``event`` as it may be stored: without :data:`UNSTORED_METADATA`, where Rasa puts the
    message metadata: a user message (its metadata and its NLU result) and the
    ``session_started_metadata`` slot (the first message's metadata of a session)."""
    if isinstance(event, SlotSet) and event.key == SESSION_START_METADATA_SLOT:
        if isinstance(event.value, dict):
            stored_slot = copy.copy(event)
            stored_slot.value = _without(event.value)
            return stored_slot
        return event
    if not isinstance(event, UserUttered) or not any(
        key in (event.metadata or {}) for key in UNSTORED_METADATA
    ):
        return event
    stored = copy.copy(event)
    stored.metadata = _without(event.metadata)
    # The NLU result carries the metadata too (Rasa copies it in).
    stored.parse_data = {**event.parse_data}  # type: ignore[typeddict-item]
    if "metadata" in stored.parse_data:
        stored.parse_data["metadata"] = _without(stored.parse_data["metadata"])  # type: ignore[typeddict-unknown-key]
    return stored


def _without(metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (metadata or {}).items() if k not in UNSTORED_METADATA}


def parse_retention_days(value: object) -> int:
    try:
        days = int(str(value))
    except ValueError:
        days = 0
    if days < 1:
        raise ValueError(
            f"SCANWATCH_CHAT_RETENTION_DAYS must be a whole number >= 1, not {value!r}"
        )
    return days


def _write_ahead(engine: sa.engine.Engine) -> None:
    """SQLite in write-ahead-log mode: a commit appends to the log (one fsync, at checkpoints
    only with ``synchronous=NORMAL``) instead of rewriting pages through a rollback journal,
    and readers do not wait for the writer. A crash of the process loses nothing committed;
    a power cut may lose the last messages (development only: production is PostgreSQL)."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def _pooled_sqlite(engine: sa.engine.Engine) -> sa.engine.Engine:
    """An engine on the same SQLite file whose connections stay open between queries (a
    queue pool; the worker threads of :meth:`PatientTrackerStore.save` share them), each
    configured once by :func:`_write_ahead`."""
    pooled = sa.create_engine(
        engine.url,
        poolclass=sa.pool.QueuePool,
        pool_size=SQLITE_POOL_SIZE,
        connect_args={"check_same_thread": False},
    )
    engine.dispose()
    _write_ahead(pooled)
    return pooled


class PatientTrackerStore(SQLTrackerStore):
    """:class:`SQLTrackerStore` that stores no token and keeps ``retention_days``."""

    def __init__(
        self,
        domain: Any = None,
        host: str | None = None,
        retention_days: object = DEFAULT_RETENTION_DAYS,
        **kwargs: Any,
    ) -> None:
        if not host or "://" not in host:
            raise ValueError(
                "the tracker store needs SCANWATCH_CHAT_DB_URL, an SQLAlchemy URL "
                "(sqlite:////path/conversations.db or postgresql://user:pw@host/chat)"
            )
        self.retention_days = parse_retention_days(retention_days)
        super().__init__(domain=domain, host=host, **kwargs)
        if self.engine.dialect.name == "sqlite":
            self.engine = _pooled_sqlite(self.engine)
            self.sessionmaker = sa.orm.session.sessionmaker(bind=self.engine)
        #: sender id -> (tracker, rows stored for the sender, how many of its events are stored)
        self._cache: OrderedDict[str, tuple[DialogueStateTracker, int, int]] = OrderedDict()
        #: sender id -> how many events of the tracker being saved are stored already, when
        #: the tracker is the cached one (read by :meth:`_additional_events`, in its save).
        self._stored_length: dict[str, int] = {}
        self._cache_lock = threading.Lock()
        #: Events deleted at start, for being older than the retention.
        self.purged = self.purge()
        log.info(
            "conversation store ready",
            extra={"retention_days": self.retention_days, "purged_events": self.purged},
        )

    def _additional_events(self, session: Any, tracker: DialogueStateTracker) -> Iterator[Event]:
        stored = self._stored_length.pop(tracker.sender_id, None)
        if stored is None:
            events = super()._additional_events(session, tracker)
        else:
            events = itertools.islice(tracker.events, stored, None)
        return (without_secrets(e) for e in events)

    def _stored_events(self, sender_id: str) -> int:
        with self.session_scope() as session:
            query = session.query(sa.func.count(self.SQLEvent.id))
            return int(query.filter(self.SQLEvent.sender_id == sender_id).scalar() or 0)

    # Rasa's SQL tracker store is synchronous inside its async methods: every query and commit
    # would stop the Rasa server's event loop (a fifth of its time per message under load).
    # These run them in a worker thread; Rasa's lock store still lets one message per
    # conversation at a time through.
    async def retrieve(self, sender_id: str) -> DialogueStateTracker | None:
        """The conversation's tracker: the cached one while it matches the database."""
        return await asyncio.to_thread(self._retrieve_now, sender_id)

    async def save(self, tracker: DialogueStateTracker) -> None:
        await asyncio.to_thread(self._save_now, tracker)

    def _retrieve_now(self, sender_id: str) -> DialogueStateTracker | None:
        with self._cache_lock:
            cached = self._cache.pop(sender_id, None)
        if cached is not None:
            tracker, rows, length = cached
            if len(tracker.events) == length and self._stored_events(sender_id) == rows:
                with self._cache_lock:
                    self._cache[sender_id] = cached
                return tracker
        tracker = asyncio.run(SQLTrackerStore.retrieve(self, sender_id))
        if tracker is not None:
            self._remember(tracker)
        return tracker

    def _save_now(self, tracker: DialogueStateTracker) -> None:
        with self._cache_lock:
            cached = self._cache.get(tracker.sender_id)
        rows = None
        if cached is not None and cached[0] is tracker and cached[2] <= len(tracker.events):
            # The tracker retrieve gave out, grown in place: its first cached[2] events are
            # the stored ones, and nobody else wrote this conversation under its lock.
            _, stored_rows, stored = cached
            self._stored_length[tracker.sender_id] = stored
            rows = stored_rows + len(tracker.events) - stored
        try:
            asyncio.run(SQLTrackerStore.save(self, tracker))
        finally:
            self._stored_length.pop(tracker.sender_id, None)
        self._remember(tracker, rows)

    def _remember(self, tracker: DialogueStateTracker, rows: int | None = None) -> None:
        sessions = sum(isinstance(e, SessionStarted) for e in tracker.events)
        if len(tracker.events) > MAX_CACHED_EVENTS or sessions > 1:
            with self._cache_lock:
                self._cache.pop(tracker.sender_id, None)
            return
        if rows is None:
            rows = self._stored_events(tracker.sender_id)
        entry = (tracker, rows, len(tracker.events))
        with self._cache_lock:
            self._cache.pop(tracker.sender_id, None)
            self._cache[tracker.sender_id] = entry
            while len(self._cache) > CACHED_CONVERSATIONS:
                self._cache.popitem(last=False)

    def purge(self, now: float | None = None) -> int:
        """Delete every event older than :attr:`retention_days`; the number deleted. (Cached
        trackers of the conversations touched no longer match the database: read again.)"""
        cutoff = (time.time() if now is None else now) - self.retention_days * DAY_S
        with self.session_scope() as session:
            removed = (
                session.query(self.SQLEvent)
                .filter(self.SQLEvent.timestamp < cutoff)
                .delete(synchronize_session=False)
            )
            session.commit()
        return int(removed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Delete stored conversations older than SCANWATCH_CHAT_RETENTION_DAYS."
    )
    parser.add_argument("command", choices=["purge"])
    parser.parse_args(argv)
    url = os.environ.get("SCANWATCH_CHAT_DB_URL")
    days = os.environ.get("SCANWATCH_CHAT_RETENTION_DAYS", DEFAULT_RETENTION_DAYS)
    try:
        store = PatientTrackerStore(host=url, retention_days=days)
    except ValueError as exc:
        sys.stderr.write(f"purge: {exc}\n")
        return 2
    sys.stderr.write(f"purge: {store.purged} events older than {days} days deleted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
