"""The resource store: every version of every resource, plus the columns searches need.

One row per resource version (``resource_version``); exactly one row per resource is current
(a partial unique index enforces it). Search columns are filled on write from the resource:
``subject_ref`` (Observation.subject as ``Type/id``) and ``resource_identifier`` rows (the
current version's ``identifier`` system|value pairs, for conditional writes later).

The schema is created with ``SQLModel.metadata.create_all`` for this skeleton; Alembic
migrations take over with the FHIR issue.

Concurrency: on SQLite, write transactions start with ``BEGIN IMMEDIATE`` (the database write
lock is taken before the current version is read, and a second writer waits up to the busy
timeout instead of failing); reads stay deferred and, in WAL mode, never wait for writers. On
PostgreSQL the current row is read ``FOR UPDATE`` and a lost create race (unique violation) is
retried.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Index, Text, UniqueConstraint, event, func, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, create_engine, delete, select

log = logging.getLogger(__name__)

#: Resource types this server stores.
SUPPORTED_TYPES = ("Patient", "Device", "ImagingStudy", "Observation")
#: Seconds a SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
#: Attempts of one write when a concurrent writer wins a race (PostgreSQL).
WRITE_ATTEMPTS = 3
_WRITE_OPTION = "scanwatch_write"
_CURRENT = text("is_current")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")


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
            "ix_resource_version_subject",
            "subject_ref",
            "last_updated",
            sqlite_where=_CURRENT,
            postgresql_where=_CURRENT,
        ),
    )

    pk: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int
    last_updated: datetime = Field(sa_type=DateTime(timezone=True))
    is_current: bool
    deleted: bool = False
    subject_ref: str | None = Field(default=None, max_length=200)
    content: str = Field(sa_type=Text)


class ResourceIdentifier(SQLModel, table=True):
    """An ``identifier`` (system|value) of the current version of a resource."""

    __tablename__ = "resource_identifier"
    __table_args__ = (
        Index("ix_resource_identifier_token", "resource_type", "system", "value"),
        Index("ix_resource_identifier_resource", "resource_type", "resource_id"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    system: str | None = Field(default=None, max_length=500)
    value: str = Field(max_length=500)


@dataclass(frozen=True)
class Stored:
    """A stored resource version as the API serves it."""

    resource_type: str
    resource_id: str
    version_id: int
    last_updated: str  # meta.lastUpdated, FHIR instant
    content: str  # JSON text

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    def resource(self) -> dict[str, Any]:
        return json.loads(self.content)


@dataclass(frozen=True)
class WriteResult:
    """What a write did: ``created`` (first version) or ``changed`` (new version) or neither."""

    stored: Stored
    created: bool
    changed: bool


def make_engine(database_url: str) -> Engine:
    """An engine for the store; SQLite gets WAL, a busy timeout and immediate write locks."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(database_url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        database_url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=FULL")  # a 2xx answer means the write is on disk
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


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


def _instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_meta(resource: dict[str, Any], version_id: int, moment: datetime) -> dict[str, Any]:
    meta = {"versionId": str(version_id), "lastUpdated": _instant(moment)}
    meta.update(resource.get("meta") or {})
    head = {"resourceType": resource["resourceType"], "id": resource["id"], "meta": meta}
    return head | {k: v for k, v in resource.items() if k not in head}


def _stored(row: ResourceVersion) -> Stored:
    last_updated = json.loads(row.content).get("meta", {}).get("lastUpdated", "")
    return Stored(row.resource_type, row.resource_id, row.version_id, last_updated, row.content)


class ResourceStore:
    """Versioned resource storage over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})

    def create_schema(self) -> None:
        SQLModel.metadata.create_all(
            self.engine, tables=[ResourceVersion.__table__, ResourceIdentifier.__table__]
        )

    def ping(self) -> None:
        """Raises when the database does not answer."""
        with Session(self.engine) as session:
            session.exec(select(1)).one()

    def read(self, resource_type: str, resource_id: str) -> Stored | None:
        """The current version, or None when absent (or deleted)."""
        with Session(self.engine) as session:
            row = session.exec(self._current(resource_type, resource_id)).first()
        return None if row is None or row.deleted else _stored(row)

    def put(self, resource: dict[str, Any]) -> WriteResult:
        """Create or update: a new version unless the current one has the same content.

        ``resource`` is a validated resource without server meta; ``resourceType`` and ``id``
        name the resource.
        """
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return self._put_once(resource)
            except IntegrityError:
                # A concurrent writer created or updated the same resource first: read again.
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.info(
                    "write race, retrying",
                    extra={"resourceType": resource["resourceType"], "id": resource["id"]},
                )
        raise AssertionError("unreachable")

    def _put_once(self, resource: dict[str, Any]) -> WriteResult:
        resource_type, resource_id = resource["resourceType"], resource["id"]
        with Session(self._write_engine) as session:
            current = session.exec(
                self._current(resource_type, resource_id).with_for_update()
            ).first()
            if current is not None and not current.deleted:
                if without_server_meta(json.loads(current.content)) == resource:
                    return WriteResult(_stored(current), created=False, changed=False)
            version_id = 1 if current is None else current.version_id + 1
            now = datetime.now(UTC)
            if current is not None:
                current.is_current = False
                session.add(current)
                session.flush()  # before the insert, or the "one current" index objects
            row = ResourceVersion(
                resource_type=resource_type,
                resource_id=resource_id,
                version_id=version_id,
                last_updated=now,
                is_current=True,
                subject_ref=_subject_ref(resource),
                content=json.dumps(_with_meta(resource, version_id, now), separators=(",", ":")),
            )
            session.add(row)
            session.exec(
                delete(ResourceIdentifier).where(
                    col(ResourceIdentifier.resource_type) == resource_type,
                    col(ResourceIdentifier.resource_id) == resource_id,
                )
            )
            session.add_all(
                ResourceIdentifier(
                    resource_type=resource_type,
                    resource_id=resource_id,
                    system=identifier.get("system"),
                    value=identifier["value"],
                )
                for identifier in resource.get("identifier", [])
                if identifier.get("value")
            )
            session.commit()
            session.refresh(row)
            stored = _stored(row)
        log.info(
            "resource stored",
            extra={"resourceType": resource_type, "id": resource_id, "versionId": version_id},
        )
        return WriteResult(stored, created=current is None, changed=True)

    def search_observations(
        self, subject_refs: list[str] | None, count: int
    ) -> tuple[int, list[Stored]]:
        """Current Observations whose subject is one of ``subject_refs`` (``Type/id``; None: any
        subject), newest first: (total matches, the first ``count``)."""
        matches = select(ResourceVersion).where(
            col(ResourceVersion.resource_type) == "Observation",
            _CURRENT,
            col(ResourceVersion.deleted).is_(False),
        )
        if subject_refs is not None:
            matches = matches.where(col(ResourceVersion.subject_ref).in_(subject_refs))
        with Session(self.engine) as session:
            total = session.exec(select(func.count()).select_from(matches.subquery())).one()
            rows = session.exec(
                matches.order_by(
                    col(ResourceVersion.last_updated).desc(), col(ResourceVersion.pk).desc()
                ).limit(count)
            ).all()
        return total, [_stored(row) for row in rows]

    @staticmethod
    def _current(resource_type: str, resource_id: str) -> Any:
        return select(ResourceVersion).where(
            col(ResourceVersion.resource_type) == resource_type,
            col(ResourceVersion.resource_id) == resource_id,
            _CURRENT,
        )


def _subject_ref(resource: dict[str, Any]) -> str | None:
    if resource["resourceType"] != "Observation":
        return None
    reference = (resource.get("subject") or {}).get("reference")
    return reference_key(reference) if reference else None
