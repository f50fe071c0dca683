"""The resource store (repository): every version of every resource, read, searched and
written over one SQLAlchemy engine. Tables are in ``models``, engines in ``database``, the
search values written beside each version in ``indexing``.

Concurrency: on SQLite writes begin ``IMMEDIATE`` (``scanwatch.database.for_writes``). On PostgreSQL
writers of one resource take a transaction-scoped advisory lock first, and a lost race (unique
violation) is retried.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import select as core_select
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement
from sqlmodel import Session, col, delete, func, select

from scanwatch.database import for_writes
from services.fhir_api.indexing import index_rows, search_values, version_row
from services.fhir_api.models import (
    CURRENT,
    ResourceChange,
    ResourceVersion,
    SearchReference,
    SearchToken,
)
from services.fhir_api.resources import Stored, instant, without_server_meta

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A conditional write's lock (PostgreSQL): the first key names the kind, the second the
#: condition (:meth:`ResourceStore.conditions_locked`).
_CONDITION_LOCK = text("SELECT pg_advisory_lock(1397506627, hashtext(:key))")
_IN_MEMORY_CONDITIONS = threading.Lock()
#: Attempts of one write when a concurrent writer wins a race (PostgreSQL).
WRITE_ATTEMPTS = 3
#: The columns a read returns: what :class:`Stored` needs, selected without building ORM objects
#: (reads are the hot path: an EHR's searches).
STORED_COLUMNS = (
    col(ResourceVersion.resource_type),
    col(ResourceVersion.resource_id),
    col(ResourceVersion.version_id),
    col(ResourceVersion.last_updated),
    col(ResourceVersion.content),
    col(ResourceVersion.deleted),
)


@dataclass(frozen=True)
class WriteResult:
    """What a write did: ``created`` (first version) or ``changed`` (new version) or neither."""

    stored: Stored
    created: bool
    changed: bool


#: The ``if_match`` of a write that may only create: it conflicts when the resource exists
#: (versions start at 1, so no version is 0).
ABSENT = 0


class VersionConflict(Exception):
    """``If-Match`` named a version that is not the current one (or :data:`ABSENT`, and the
    resource exists)."""

    def __init__(
        self, current: int | None, key: str | None = None, expected: int | None = None
    ) -> None:
        super().__init__(f"current version of {key or 'the resource'} is {current}")
        self.current = current
        self.key = key  # Type/id of the resource
        self.expected = expected  # the if_match asked for


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes (stored as UTC); PostgreSQL returns aware ones.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


#: A row of :data:`STORED_COLUMNS`.
StoredRow = Row[str, str, int, datetime, str, bool]


def to_stored(row: ResourceVersion | StoredRow) -> Stored:
    """The :class:`Stored` of a version row (an ORM object or a row of :data:`STORED_COLUMNS`)."""
    return Stored(
        row.resource_type,
        row.resource_id,
        row.version_id,
        instant(_aware(row.last_updated)),
        row.content,
        row.deleted,
    )


def _change(row: ResourceVersion) -> ResourceChange:
    return ResourceChange(
        resource_type=row.resource_type, resource_id=row.resource_id, version_id=row.version_id
    )


# --- The store -------------------------------------------------------------------------------


class ResourceStore:
    """Versioned resource storage over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write_engine = for_writes(engine)
        self._read_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.backend == "postgresql"
            else engine
        )

    @property
    def backend(self) -> str:
        return self.engine.url.get_backend_name()

    def ping(self) -> None:
        """Raises when the database does not answer."""
        with self.reading() as connection:
            connection.execute(text("SELECT 1")).one()

    @contextmanager
    def conditions_locked(self, conditions: Iterable[str]) -> Iterator[None]:
        """Hold the ``conditions`` (``Type?search``, as :func:`~services.fhir_api.transactions.
        condition_key` writes them) against every other writer conditional on one of them, from
        the search that finds no match to the write that creates: two clients that create "if
        none exists" at once would otherwise both find none and both create.

        PostgreSQL: a session-level advisory lock per condition (the two-key form, a key space
        apart from the per-resource locks of :meth:`_lock`), on a connection held meanwhile,
        taken in sorted order. SQLite: one exclusive ``flock`` on a file beside the database,
        which serialises every API process's conditional writes (threads too: each opens the
        file), or a process-wide lock for an in-memory database."""
        keys = sorted(set(conditions))
        if not keys:
            yield
        elif self.backend == "postgresql":
            with self.engine.connect() as connection:
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
                try:
                    for key in keys:
                        connection.execute(_CONDITION_LOCK, {"key": key})
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock_all()"))
        elif database := self.engine.url.database:
            with open(f"{database}.conditions.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
                yield
        else:
            with _IN_MEMORY_CONDITIONS:
                yield

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reads (one pool checkout, shared by what one request reads and
        audits). On PostgreSQL it is in autocommit mode: each statement runs on its own
        snapshot, as under the default READ COMMITTED, without BEGIN/ROLLBACK round trips."""
        with self._read_engine.connect() as connection:
            yield connection

    def connect(self) -> Connection:
        """A connection the caller holds and closes, like :meth:`reading`'s."""
        return self._read_engine.connect()

    @contextmanager
    def _reader(self, connection: Connection | None) -> Iterator[Connection]:
        if connection is not None:
            yield connection
        else:
            with self.reading() as own:
                yield own

    # --- reads ----------------------------------------------------------------------------

    def read(
        self, resource_type: str, resource_id: str, connection: Connection | None = None
    ) -> Stored | None:
        """The current version (a deletion is returned with ``deleted`` set), or None."""
        statement = core_select(*STORED_COLUMNS).where(
            col(ResourceVersion.resource_type) == resource_type,
            col(ResourceVersion.resource_id) == resource_id,
            CURRENT,
        )
        with self._reader(connection) as reader:
            row = reader.execute(statement).first()
        return None if row is None else to_stored(row)

    def vread(
        self,
        resource_type: str,
        resource_id: str,
        version_id: int,
        connection: Connection | None = None,
    ) -> Stored | None:
        statement = core_select(*STORED_COLUMNS).where(
            col(ResourceVersion.resource_type) == resource_type,
            col(ResourceVersion.resource_id) == resource_id,
            col(ResourceVersion.version_id) == version_id,
        )
        with self._reader(connection) as reader:
            row = reader.execute(statement).first()
        return None if row is None else to_stored(row)

    def history(
        self,
        resource_type: str,
        resource_id: str | None,
        since: datetime | None,
        count: int,
        offset: int,
        connection: Connection | None = None,
    ) -> tuple[int, list[Stored]]:
        """Versions of one resource (or of every resource of a type), newest first."""
        where: list[Any] = [col(ResourceVersion.resource_type) == resource_type]
        if resource_id is not None:
            where.append(col(ResourceVersion.resource_id) == resource_id)
        if since is not None:
            where.append(col(ResourceVersion.last_updated) >= since)
        with self._reader(connection) as reader:
            total = reader.execute(
                core_select(func.count()).select_from(ResourceVersion).where(*where)
            ).scalar_one()
            rows = reader.execute(
                core_select(*STORED_COLUMNS)
                .where(*where)
                .order_by(col(ResourceVersion.last_updated).desc(), col(ResourceVersion.pk).desc())
                .offset(offset)
                .limit(count)
            ).all()
        return total, [to_stored(row) for row in rows]

    def search(
        self,
        resource_type: str,
        where: Sequence[ColumnElement[bool]],
        order_by: Sequence[Any],
        count: int,
        offset: int,
        total_limit: int | None,
        connection: Connection | None = None,
    ) -> tuple[int | None, list[Stored]]:
        """Current, not deleted resources of a type matching every ``where`` clause.

        Returns (total, one page). The total is counted up to ``total_limit`` matches
        (None: exactly) and is None when there are more.
        """
        count_statement, page_statement = self.search_statements(
            resource_type, where, order_by, count, offset, total_limit
        )
        total: int | None = None
        with self._reader(connection) as reader:
            rows = reader.execute(page_statement).all() if count else []
            if count_statement is not None:
                if offset == 0 and len(rows) < count:
                    counted = len(rows)  # every match is on this page: nothing to count
                else:
                    counted = reader.execute(count_statement).scalar_one()
                total = counted if total_limit is None or counted <= total_limit else None
        return total, [to_stored(row) for row in rows]

    def search_statements(
        self,
        resource_type: str,
        where: Sequence[ColumnElement[bool]],
        order_by: Sequence[Any],
        count: int,
        offset: int,
        total_limit: int | None,
    ) -> tuple[Any | None, Any]:
        """The SQL a :meth:`search` runs: (the bounded count or None, the page).

        The bounded count walks the matches in the page's order. Without it PostgreSQL may
        pick "any 1001 matches" by primary key, which for ``date=ge<recent>`` means reading
        every old row first (pk follows time): seconds at a million rows instead of
        milliseconds (bench/fhir.md).
        """
        matches = core_select(col(ResourceVersion.pk)).where(
            *self.current_of(resource_type), *where
        )
        order = [*order_by, col(ResourceVersion.pk).desc()]
        count_statement = None
        if total_limit is None:
            count_statement = core_select(func.count()).select_from(matches.subquery())
        elif total_limit:
            count_statement = core_select(func.count()).select_from(
                matches.order_by(*order).limit(total_limit + 1).subquery()
            )
        page_statement = (
            core_select(*STORED_COLUMNS)
            .where(*self.current_of(resource_type), *where)
            .order_by(*order)
            .offset(offset)
            .limit(count)
        )
        return count_statement, page_statement

    def read_many(self, keys: Iterable[str], connection: Connection | None = None) -> list[Stored]:
        """Current, not deleted resources named ``Type/id`` (absent ones skipped)."""
        found: list[Stored] = []
        by_type: dict[str, set[str]] = {}
        for key in keys:
            resource_type, _, resource_id = key.partition("/")
            by_type.setdefault(resource_type, set()).add(resource_id)
        with self._reader(connection) as reader:
            for resource_type, resource_ids in sorted(by_type.items()):
                rows = reader.execute(
                    core_select(*STORED_COLUMNS)
                    .where(
                        *self.current_of(resource_type),
                        col(ResourceVersion.resource_id).in_(sorted(resource_ids)),
                    )
                    .order_by(col(ResourceVersion.resource_id))
                ).all()
                found += [to_stored(row) for row in rows]
        return found

    def referencing(
        self,
        resource_type: str,
        param: str,
        targets: Iterable[str],
        connection: Connection | None = None,
    ) -> list[Stored]:
        """Current resources of ``resource_type`` whose ``param`` references one of ``targets``."""
        targets = sorted(set(targets))
        if not targets:
            return []
        with self._reader(connection) as reader:
            rows = reader.execute(
                core_select(*STORED_COLUMNS)
                .where(
                    *self.current_of(resource_type),
                    col(ResourceVersion.pk).in_(
                        core_select(col(SearchReference.resource_pk)).where(
                            col(SearchReference.resource_type) == resource_type,
                            col(SearchReference.param) == param,
                            col(SearchReference.target).in_(targets),
                        )
                    ),
                )
                .order_by(col(ResourceVersion.resource_id))
            ).all()
        return [to_stored(row) for row in rows]

    # --- the notifier's outbox -------------------------------------------------------------

    def pending_changes(self, limit: int, connection: Connection) -> list[ResourceChange]:
        """The oldest ``limit`` changes not yet handled, oldest first."""
        rows = connection.execute(
            core_select(ResourceChange.__table__).order_by(col(ResourceChange.pk)).limit(limit)  # type: ignore[attr-defined]
        ).all()
        # End the read at once: the notifier keeps this connection for its lifetime, and an
        # open SQLite read transaction would hold a lock that stops every writer.
        connection.rollback()
        return [ResourceChange(**row._mapping) for row in rows]

    def forget_changes(self, pks: Sequence[int], connection: Connection) -> None:
        """Delete handled changes (committed before it returns)."""
        connection.execute(delete(ResourceChange).where(col(ResourceChange.pk).in_(pks)))
        connection.commit()

    # --- writes ---------------------------------------------------------------------------

    def put(self, resource: dict[str, Any], if_match: int | None = None) -> WriteResult:
        """Create or update: a new version unless the current one has the same content.

        ``resource`` is a validated resource without server meta; ``resourceType`` and ``id``
        name the resource. ``if_match`` (a version id) makes the write conditional: raises
        :class:`VersionConflict` when it is not the current version.
        """
        return self._retrying(lambda: self._put_once(resource, if_match))

    def delete(self, resource_type: str, resource_id: str) -> Stored | None:
        """Mark a resource deleted (a new version); None when it never existed."""
        return self._retrying(lambda: self._delete_once(resource_type, resource_id))

    def _retrying(self, write: Callable[[], T]) -> T:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return write()
            except IntegrityError:
                # A concurrent writer created or updated the same resource first: read again.
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.info("write race, retrying")
        raise AssertionError("unreachable")

    def put_all(
        self,
        writes: Sequence[tuple[dict[str, Any], int | None]],
        ensure: Sequence[dict[str, Any]] = (),
    ) -> list[WriteResult]:
        """Write several resources in one database transaction (a FHIR transaction Bundle):
        every write happens or none does. Each is (resource, ``if_match``) as for :meth:`put`;
        a :class:`VersionConflict` on any of them rolls back all of them. ``ensure`` are
        resources created in the same transaction only if they do not exist (an existing one is
        left as it is). Writers of the same resources are serialised by taking their locks in
        one order (no deadlock). Returns the results of ``ensure``, then of ``writes``."""
        return self._retrying(lambda: self._put_all_once(writes, ensure))

    def _put_once(self, resource: dict[str, Any], if_match: int | None) -> WriteResult:
        return self._put_all_once([(resource, if_match)], ())[0]

    def _put_all_once(
        self,
        writes: Sequence[tuple[dict[str, Any], int | None]],
        ensure: Sequence[dict[str, Any]],
    ) -> list[WriteResult]:
        results: list[tuple[WriteResult, ResourceVersion | None]] = []
        everything = [*ensure, *(resource for resource, _ in writes)]
        with Session(self._write_engine) as session:
            for key in sorted({f"{r['resourceType']}/{r['id']}" for r in everything}):
                resource_type, _, resource_id = key.partition("/")
                self._lock(session, resource_type, resource_id)
            for resource in ensure:
                current = session.exec(
                    self._current(resource["resourceType"], resource["id"])
                ).first()
                if current is not None and not current.deleted:
                    results.append((WriteResult(to_stored(current), False, False), None))
                else:
                    results.append(self._put_in(session, resource, None))
            for resource, if_match in writes:
                results.append(self._put_in(session, resource, if_match))
            session.commit()
            for _result, row in results:
                if row is not None:
                    session.refresh(row)
            done = [
                result if row is None else WriteResult(to_stored(row), result.created, True)
                for result, row in results
            ]
        for result in done:
            if result.changed:
                log.info(
                    "resource stored",
                    extra={
                        "resourceType": result.stored.resource_type,
                        "id": result.stored.resource_id,
                        "versionId": result.stored.version_id,
                    },
                )
        return done

    def _put_in(
        self, session: Session, resource: dict[str, Any], if_match: int | None
    ) -> tuple[WriteResult, ResourceVersion | None]:
        """One write inside ``session`` (locked, not committed): its result and the new row
        (None when the content was unchanged)."""
        resource_type, resource_id = resource["resourceType"], resource["id"]
        values = search_values(resource)
        current = session.exec(self._current(resource_type, resource_id).with_for_update()).first()
        key = f"{resource_type}/{resource_id}"
        if if_match == ABSENT:
            if current is not None and not current.deleted:
                raise VersionConflict(current.version_id, key, ABSENT)
        elif if_match is not None and (
            current is None or current.deleted or current.version_id != if_match
        ):
            raise VersionConflict(None if current is None else current.version_id, key, if_match)
        if current is not None and not current.deleted:
            if without_server_meta(json.loads(current.content)) == resource:
                return WriteResult(to_stored(current), created=False, changed=False), None
        version_id = 1 if current is None else current.version_id + 1
        created = current is None or current.deleted
        row = version_row(resource, version_id, datetime.now(UTC), values)
        self._replace_current(session, current, row)
        assert row.pk is not None  # assigned by the flush
        tokens, references = index_rows(resource_type, row.pk, values)
        session.add_all(tokens)
        session.add_all(references)
        session.add(_change(row))
        placeholder = Stored(resource_type, resource_id, version_id, "", "")
        return WriteResult(placeholder, created=created, changed=True), row

    def _delete_once(self, resource_type: str, resource_id: str) -> Stored | None:
        with Session(self._write_engine) as session:
            self._lock(session, resource_type, resource_id)
            current = session.exec(
                self._current(resource_type, resource_id).with_for_update()
            ).first()
            if current is None:
                return None
            if current.deleted:
                return to_stored(current)
            row = ResourceVersion(
                resource_type=resource_type,
                resource_id=resource_id,
                version_id=current.version_id + 1,
                last_updated=datetime.now(UTC),
                is_current=True,
                deleted=True,
                content="",
            )
            self._replace_current(session, current, row)
            session.add(_change(row))
            session.commit()
            session.refresh(row)
            log.info("resource deleted", extra={"resourceType": resource_type, "id": resource_id})
            return to_stored(row)

    def _lock(self, session: Session, resource_type: str, resource_id: str) -> None:
        """Serialize writers of one resource. PostgreSQL: a transaction-scoped advisory lock
        (``FOR UPDATE`` alone does not: a waiter re-checks ``is_current`` on the row the winner
        just retired, finds nothing and tries to create). SQLite: ``BEGIN IMMEDIATE``."""
        if self.backend == "postgresql":
            session.exec(
                select(func.pg_advisory_xact_lock(func.hashtext(f"{resource_type}/{resource_id}")))
            ).one()

    @staticmethod
    def _replace_current(
        session: Session, current: ResourceVersion | None, row: ResourceVersion
    ) -> None:
        if current is not None:
            for table in (SearchToken, SearchReference):
                session.exec(delete(table).where(col(table.resource_pk) == current.pk))
            current.is_current = False
            session.add(current)
            session.flush()  # before the insert, or the "one current" index objects
        session.add(row)
        session.flush()  # assigns row.pk for the index rows

    @staticmethod
    def current_of(resource_type: str) -> list[Any]:
        return [
            col(ResourceVersion.resource_type) == resource_type,
            CURRENT,
            col(ResourceVersion.deleted).is_(False),
        ]

    @staticmethod
    def _current(resource_type: str, resource_id: str) -> Any:
        return select(ResourceVersion).where(
            col(ResourceVersion.resource_type) == resource_type,
            col(ResourceVersion.resource_id) == resource_id,
            CURRENT,
        )
