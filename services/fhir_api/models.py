"""The FHIR store's tables. Alembic owns the schema (``migrations/``); these models must match
the latest migration, which a test checks.

One row per resource version (``resource_version``); exactly one row per resource is current
(a partial unique index enforces it). Search values are extracted on write from the current
version only (``indexing``):

- columns of ``resource_version``: ``subject_ref`` (``subject`` as ``Type/id``) and
  ``effective_start``/``effective_end`` (the ``[start, end)`` UTC range of
  ``effective[x]``), so the hot Observation searches (by patient, by date) need no join;
- ``search_token`` rows: token parameters (``identifier``, ``code``, ``category``,
  ``status``) as system|code;
- ``search_reference`` rows: reference parameters other than the subject
  (``Provenance.target``), for ``target=`` and ``_revinclude=Provenance:target``.

``resource_change`` is the subscription notifier's outbox; ``audit_event`` the read audit.
The registered clients' ``oauth_client`` is :class:`services.auth.clients.OAuthClient`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

#: The partial-index condition (and filter) of current versions.
CURRENT = text("is_current")


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
            sqlite_where=CURRENT,
            postgresql_where=CURRENT,
        ),
        Index(
            "ix_resource_version_subject_effective",
            "subject_ref",
            "effective_start",
            sqlite_where=CURRENT,
            postgresql_where=CURRENT,
        ),
        Index(
            "ix_resource_version_type_updated",
            "resource_type",
            "last_updated",
            sqlite_where=CURRENT,
            postgresql_where=CURRENT,
        ),
        Index(
            "ix_resource_version_type_effective",
            "resource_type",
            "effective_end",
            sqlite_where=CURRENT,
            postgresql_where=CURRENT,
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


class AuditEvent(SQLModel, table=True):
    """Who read what, when. No PHI: the client, the interaction, the resource type, logical ids
    (opaque UUIDs), the names (never the values) of the search parameters and the outcome."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_recorded", "recorded"),)

    pk: int | None = Field(default=None, primary_key=True)
    recorded: datetime = Field(sa_type=DateTime(timezone=True))
    client_id: str = Field(max_length=100)
    token_id: str | None = Field(default=None, max_length=64)
    interaction: str = Field(max_length=32)
    resource_type: str | None = Field(default=None, max_length=64)
    resource_id: str | None = Field(default=None, max_length=64)
    parameters: str | None = Field(default=None, max_length=500)
    status: int
    returned: int = 0
