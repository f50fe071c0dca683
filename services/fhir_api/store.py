"""The resource store: every version of every resource, plus the index rows searches need.

One row per resource version (``resource_version``); exactly one row per resource is current
(a partial unique index enforces it). Search values are extracted on write from the current
version only:

- columns of ``resource_version``: ``subject_ref`` (``subject`` as ``Type/id``) and
  ``effective_start``/``effective_end`` (the ``[start, end)`` UTC range of
  ``effective[x]``), so the hot Observation searches (by patient, by date) need no join;
- ``search_token`` rows: token parameters (``identifier``, ``code``, ``category``,
  ``status``) as system|code;
- ``search_reference`` rows: reference parameters other than the subject
  (``Provenance.target``), for ``target=`` and ``_revinclude=Provenance:target``.

Alembic owns the schema (``services/fhir_api/migrations``); the table models here must match
the latest migration, which a test checks.

Concurrency: on SQLite, write transactions start with ``BEGIN IMMEDIATE`` (the database write
lock is taken before the current version is read, and a second writer waits up to the busy
timeout instead of failing); reads stay deferred and, in WAL mode, never wait for writers. On
PostgreSQL writers of one resource take a transaction-scoped advisory lock first, and a lost
race (unique violation) is retried.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection, Engine, Row, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError
from sqlalchemy.sql import ColumnElement
from sqlmodel import Field, Session, SQLModel, col, create_engine, delete, func, select

from services.fhir_api.fhirdates import fhir_range

log = logging.getLogger(__name__)

#: Resource types this server stores.
SUPPORTED_TYPES = (
    "Patient",
    "Device",
    "ImagingStudy",
    "Observation",
    "DiagnosticReport",
    "Provenance",
    "Subscription",
)
#: Seconds a SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
#: Attempts of one write when a concurrent writer wins a race (PostgreSQL).
WRITE_ATTEMPTS = 3
_WRITE_OPTION = "scanwatch_write"
_CURRENT = text("is_current")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
#: FHIR ``id`` datatype.
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
#: Types whose ``subject`` is indexed for ``patient=``/``subject=``.
SUBJECT_TYPES = ("Observation", "ImagingStudy", "DiagnosticReport")
#: Types whose ``effective[x]`` is indexed for ``date=``.
EFFECTIVE_TYPES = ("Observation", "DiagnosticReport")


class ResourceVersion(SQLModel, table=True):
    """One version of one resource; ``content`` is the resource JSON including ``meta``."""

    __tablename__ = "resource_version"
    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id", "version_id"),
        Index(
            "ux_resource_version_current",
            "resource_type",
            "resource_id",
            unique=True,
            sqlite_where=_CURRENT,
            postgresql_where=_CURRENT,
        ),
        Index(
            "ix_resource_version_subject_effective",
            "subject_ref",
            "effective_start",
            sqlite_where=_CURRENT,
            postgresql_where=_CURRENT,
        ),
        Index(
            "ix_resource_version_type_updated",
            "resource_type",
            "last_updated",
            sqlite_where=_CURRENT,
            postgresql_where=_CURRENT,
        ),
        Index(
            "ix_resource_version_type_effective",
            "resource_type",
            "effective_end",
            sqlite_where=_CURRENT,
            postgresql_where=_CURRENT,
        ),
        Index("ix_resource_version_history", "resource_type", "last_updated"),
    )

    pk: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer, "sqlite")
    )
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int
    last_updated: datetime = Field(sa_type=DateTime(timezone=True))
    is_current: bool
    deleted: bool = False
    subject_ref: str | None = Field(default=None, max_length=200)
    effective_start: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    effective_end: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    content: str = Field(sa_type=Text)


class SearchToken(SQLModel, table=True):
    """A token search value (system|code) of the current version of a resource."""

    __tablename__ = "search_token"
    __table_args__ = (Index("ix_search_token_value", "resource_type", "param", "code", "system"),)

    pk: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer, "sqlite")
    )
    resource_pk: int = Field(
        sa_type=BigInteger().with_variant(Integer, "sqlite"),
        sa_column_args=[ForeignKey("resource_version.pk", ondelete="CASCADE")],
        index=True,
    )
    resource_type: str = Field(max_length=64)
    param: str = Field(max_length=64)
    system: str | None = Field(default=None, max_length=500)
    code: str = Field(max_length=500)


class SearchReference(SQLModel, table=True):
    """A reference search value (``Type/id``) of the current version of a resource."""

    __tablename__ = "search_reference"
    __table_args__ = (Index("ix_search_reference_target", "resource_type", "param", "target"),)

    pk: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer, "sqlite")
    )
    resource_pk: int = Field(
        sa_type=BigInteger().with_variant(Integer, "sqlite"),
        sa_column_args=[ForeignKey("resource_version.pk", ondelete="CASCADE")],
        index=True,
    )
    resource_type: str = Field(max_length=64)
    param: str = Field(max_length=64)
    target: str = Field(max_length=200)


class ResourceChange(SQLModel, table=True):
    """A new version not yet handled by the subscription notifier (its outbox): written in the
    same transaction as the version, deleted by the notifier once handled."""

    __tablename__ = "resource_change"

    pk: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer, "sqlite")
    )
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int


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
class Stored:
    """A stored resource version as the API serves it."""

    resource_type: str
    resource_id: str
    version_id: int
    last_updated: str  # meta.lastUpdated, FHIR instant
    content: str  # JSON text; empty for a deletion
    deleted: bool = False

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def key(self) -> str:
        return f"{self.resource_type}/{self.resource_id}"

    def resource(self) -> dict[str, Any]:
        return json.loads(self.content)


@dataclass(frozen=True)
class WriteResult:
    """What a write did: ``created`` (first version) or ``changed`` (new version) or neither."""

    stored: Stored
    created: bool
    changed: bool


class VersionConflict(Exception):
    """``If-Match`` named a version that is not the current one."""

    def __init__(self, current: int | None) -> None:
        super().__init__(f"current version is {current}")
        self.current = current


#: Connections each API process keeps open to PostgreSQL (and as many more while busy).
PG_POOL_SIZE = 10
#: A pooled PostgreSQL connection idle longer than this is pinged before use (see make_engine).
PG_PING_IDLE_S = 5.0


def make_engine(database_url: str, ping_idle_s: float = PG_PING_IDLE_S, **kwargs: Any) -> Engine:
    """An engine for the store; SQLite gets WAL, a busy timeout and immediate write locks;
    PostgreSQL connections idle over ``ping_idle_s`` are checked before use."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # psycopg prepares a statement after its 5th run; PostgreSQL then switches to a generic
        # plan when its estimate looks no worse, which for the date and patient searches it is
        # not (the bounds decide between index walks): planning every run with the actual values
        # more than halved PostgreSQL's CPU per search (bench/fhir.md). Parsing is still saved.
        connect_args = {"options": "-c plan_cache_mode=force_custom_plan"}
        # Connections beyond pool_size are closed when returned; a worker serving more
        # concurrent requests than that opened (and PostgreSQL forked) a connection per
        # request (bench/fhir.md). Ten stay open per process.
        kwargs = {"pool_size": PG_POOL_SIZE, "max_overflow": PG_POOL_SIZE} | kwargs
        engine = create_engine(database_url, connect_args=connect_args, **kwargs)
        _ping_when_idle(engine, ping_idle_s)
        return engine
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        database_url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        **kwargs,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=FULL")  # a 2xx answer means the write is on disk
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection before use only when it sat idle over ``idle_s`` seconds.

    ``pool_pre_ping`` pings on every checkout: a round trip per request, 10 % of the API's CPU
    and a fifth of its searches per second under load (bench/fhir.md). Connections in steady
    use have just proved alive; the ones that sat idle (PostgreSQL restarted, a firewall
    dropped them) are the ones to check. A failed ping makes the pool discard the connection
    and open a new one (SQLAlchemy's "custom pessimistic ping" recipe). A connection that dies
    in the ``idle_s`` after its last use fails its request with 503 (the database error
    handler) and the pool replaces it.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise DisconnectionError(f"idle connection is gone: {error}") from error


def for_writes(engine: Engine) -> Engine:
    """``engine`` for transactions that write: on SQLite they begin IMMEDIATE, so that a read
    followed by a write waits for other writers instead of failing at once ("database is
    locked": a deferred read snapshot cannot be upgraded once another writer committed)."""
    return engine.execution_options(**{_WRITE_OPTION: True})


def reference_key(reference: str) -> str | None:
    """``Type/id`` of a relative or absolute literal reference (a ``_history`` suffix dropped);
    None when it is not one."""
    parts = reference.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and _TYPE_RE.match(parts[-2]) and parts[-1]:
        return f"{parts[-2]}/{parts[-1]}"
    return None


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without the parts the server owns (meta.versionId, meta.lastUpdated)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in _SERVER_META}
    result = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        result["meta"] = meta
    return result


_SERVER_META = ("versionId", "lastUpdated")


def instant(moment: datetime) -> str:
    """A FHIR instant (UTC, milliseconds)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_meta(resource: dict[str, Any], version_id: int, moment: datetime) -> dict[str, Any]:
    meta = {"versionId": str(version_id), "lastUpdated": instant(moment)}
    meta.update(resource.get("meta") or {})
    head = {"resourceType": resource["resourceType"], "id": resource["id"], "meta": meta}
    return head | {k: v for k, v in resource.items() if k not in head}


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes (stored as UTC); PostgreSQL returns aware ones.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def to_stored(row: ResourceVersion | Row[Any]) -> Stored:
    """The :class:`Stored` of a version row (an ORM object or a row of :data:`STORED_COLUMNS`)."""
    return Stored(
        row.resource_type,
        row.resource_id,
        row.version_id,
        instant(_aware(row.last_updated)),
        row.content,
        row.deleted,
    )


# --- Search value extraction ----------------------------------------------------------------


@dataclass(frozen=True)
class SearchValues:
    """What one resource contributes to the search indexes."""

    subject_ref: str | None
    effective: tuple[datetime, datetime] | None
    tokens: tuple[tuple[str, str | None, str], ...]  # (param, system, code)
    references: tuple[tuple[str, str], ...]  # (param, Type/id)


def _codings(concepts: Iterable[dict[str, Any]]) -> Iterable[tuple[str | None, str]]:
    for concept in concepts:
        for coding in concept.get("coding") or []:
            if coding.get("code"):
                yield coding.get("system"), coding["code"]


def search_values(resource: dict[str, Any]) -> SearchValues:
    """The search values of a (valid) resource."""
    resource_type = resource["resourceType"]
    tokens: list[tuple[str, str | None, str]] = [
        ("identifier", identifier.get("system"), identifier["value"])
        for identifier in resource.get("identifier") or []
        if identifier.get("value")
    ]
    if isinstance(resource.get("status"), str):
        tokens.append(("status", None, resource["status"]))
    if resource_type in ("Observation", "DiagnosticReport"):
        tokens += [("code", s, c) for s, c in _codings([resource.get("code") or {}])]
        tokens += [("category", s, c) for s, c in _codings(resource.get("category") or [])]
    subject_ref = None
    if resource_type in SUBJECT_TYPES:
        reference = (resource.get("subject") or {}).get("reference")
        subject_ref = reference_key(reference) if reference else None
    effective = None
    if resource_type in EFFECTIVE_TYPES:
        if value := resource.get("effectiveDateTime") or resource.get("effectiveInstant"):
            effective = fhir_range(value)
        elif period := resource.get("effectivePeriod"):
            start = fhir_range(period["start"])[0] if period.get("start") else datetime.min
            end = fhir_range(period["end"])[1] if period.get("end") else datetime.max
            effective = (start.replace(tzinfo=UTC), end.replace(tzinfo=UTC))
    references: list[tuple[str, str]] = []
    if resource_type == "Provenance":
        for target in resource.get("target") or []:
            if target.get("reference") and (key := reference_key(target["reference"])):
                references.append(("target", key))
    return SearchValues(subject_ref, effective, tuple(dict.fromkeys(tokens)), tuple(references))


def version_row(
    resource: dict[str, Any], version_id: int, moment: datetime, values: SearchValues
) -> ResourceVersion:
    """The current-version row of ``resource`` (without server meta) as the store writes it."""
    return ResourceVersion(
        resource_type=resource["resourceType"],
        resource_id=resource["id"],
        version_id=version_id,
        last_updated=moment,
        is_current=True,
        subject_ref=values.subject_ref,
        effective_start=values.effective[0] if values.effective else None,
        effective_end=values.effective[1] if values.effective else None,
        content=json.dumps(_with_meta(resource, version_id, moment), separators=(",", ":")),
    )


def index_rows(
    resource_type: str, resource_pk: int, values: SearchValues
) -> tuple[list[SearchToken], list[SearchReference]]:
    """The search index rows of the version row ``resource_pk``."""
    tokens = [
        SearchToken(resource_pk=resource_pk, resource_type=resource_type, param=p, system=s, code=c)
        for p, s, c in values.tokens
    ]
    references = [
        SearchReference(resource_pk=resource_pk, resource_type=resource_type, param=p, target=t)
        for p, t in values.references
    ]
    return tokens, references


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
            _CURRENT,
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

    def _retrying(self, write: Any) -> Any:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return write()
            except IntegrityError:
                # A concurrent writer created or updated the same resource first: read again.
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.info("write race, retrying")
        raise AssertionError("unreachable")

    def _put_once(self, resource: dict[str, Any], if_match: int | None) -> WriteResult:
        resource_type, resource_id = resource["resourceType"], resource["id"]
        values = search_values(resource)
        with Session(self._write_engine) as session:
            self._lock(session, resource_type, resource_id)
            current = session.exec(
                self._current(resource_type, resource_id).with_for_update()
            ).first()
            if if_match is not None and (
                current is None or current.deleted or current.version_id != if_match
            ):
                raise VersionConflict(None if current is None else current.version_id)
            if current is not None and not current.deleted:
                if without_server_meta(json.loads(current.content)) == resource:
                    return WriteResult(to_stored(current), created=False, changed=False)
            version_id = 1 if current is None else current.version_id + 1
            created = current is None or current.deleted
            row = version_row(resource, version_id, datetime.now(UTC), values)
            self._replace_current(session, current, row)
            assert row.pk is not None  # assigned by the flush
            tokens, references = index_rows(resource_type, row.pk, values)
            session.add_all(tokens)
            session.add_all(references)
            session.add(_change(row))
            session.commit()
            session.refresh(row)
            stored = to_stored(row)
        log.info(
            "resource stored",
            extra={"resourceType": resource_type, "id": resource_id, "versionId": version_id},
        )
        return WriteResult(stored, created=created, changed=True)

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
            _CURRENT,
            col(ResourceVersion.deleted).is_(False),
        ]

    @staticmethod
    def _current(resource_type: str, resource_id: str) -> Any:
        return select(ResourceVersion).where(
            col(ResourceVersion.resource_type) == resource_type,
            col(ResourceVersion.resource_id) == resource_id,
            _CURRENT,
        )
