"""Search indexes (dates, tokens, references), OAuth clients and the audit trail.

Revision ID: 0002
Revises: 0001
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CURRENT = sa.text("is_current")
BIG_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("resource_version") as batch:
        batch.add_column(sa.Column("effective_start", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("effective_end", sa.DateTime(timezone=True), nullable=True))
        if op.get_bind().dialect.name == "postgresql":
            batch.alter_column("pk", type_=sa.BigInteger(), existing_type=sa.Integer())
    op.drop_index("ix_resource_version_subject", table_name="resource_version")
    for name, columns in (
        ("ix_resource_version_subject_effective", ["subject_ref", "effective_start"]),
        ("ix_resource_version_type_updated", ["resource_type", "last_updated"]),
        ("ix_resource_version_type_effective", ["resource_type", "effective_end"]),
    ):
        op.create_index(
            name, "resource_version", columns, sqlite_where=CURRENT, postgresql_where=CURRENT
        )
    op.create_index(
        "ix_resource_version_history", "resource_version", ["resource_type", "last_updated"]
    )
    op.create_table(
        "search_token",
        sa.Column("pk", BIG_PK, primary_key=True),
        sa.Column(
            "resource_pk",
            BIG_PK,
            sa.ForeignKey("resource_version.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("system", sa.String(500), nullable=True),
        sa.Column("code", sa.String(500), nullable=False),
    )
    op.create_index("ix_search_token_resource_pk", "search_token", ["resource_pk"])
    op.create_index(
        "ix_search_token_value", "search_token", ["resource_type", "param", "code", "system"]
    )
    op.create_table(
        "search_reference",
        sa.Column("pk", BIG_PK, primary_key=True),
        sa.Column(
            "resource_pk",
            BIG_PK,
            sa.ForeignKey("resource_version.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
    )
    op.create_index("ix_search_reference_resource_pk", "search_reference", ["resource_pk"])
    op.create_index(
        "ix_search_reference_target", "search_reference", ["resource_type", "param", "target"]
    )
    op.create_table(
        "oauth_client",
        sa.Column("client_id", sa.String(100), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("patient", sa.String(64), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "audit_event",
        sa.Column("pk", sa.Integer(), primary_key=True),
        sa.Column("recorded", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_id", sa.String(100), nullable=False),
        sa.Column("token_id", sa.String(64), nullable=True),
        sa.Column("interaction", sa.String(32), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=True),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("parameters", sa.String(500), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("returned", sa.Integer(), nullable=False),
    )
    op.create_index("ix_audit_event_recorded", "audit_event", ["recorded"])
    _backfill()
    op.drop_table("resource_identifier")


def _backfill() -> None:
    """Index rows of the resources stored before this revision (their current versions)."""
    from services.fhir_api.indexing import search_values  # the extraction as of this revision

    bind = op.get_bind()
    version = sa.table(
        "resource_version",
        sa.column("pk"),
        sa.column("content"),
        sa.column("is_current"),
        sa.column("deleted"),
        sa.column("effective_start"),
        sa.column("effective_end"),
    )
    token = sa.table(
        "search_token",
        sa.column("resource_pk"),
        sa.column("resource_type"),
        sa.column("param"),
        sa.column("system"),
        sa.column("code"),
    )
    reference = sa.table(
        "search_reference",
        sa.column("resource_pk"),
        sa.column("resource_type"),
        sa.column("param"),
        sa.column("target"),
    )
    rows = bind.execute(
        sa.select(version.c.pk, version.c.content).where(
            version.c.is_current.is_(True), version.c.deleted.is_(False)
        )
    ).all()
    for pk, content in rows:
        resource = json.loads(content)
        values = search_values(resource)
        if values.effective:
            bind.execute(
                version.update()
                .where(version.c.pk == pk)
                .values(effective_start=values.effective[0], effective_end=values.effective[1])
            )
        for param, system, code in values.tokens:
            bind.execute(
                token.insert().values(
                    resource_pk=pk,
                    resource_type=resource["resourceType"],
                    param=param,
                    system=system,
                    code=code,
                )
            )
        for param, target in values.references:
            bind.execute(
                reference.insert().values(
                    resource_pk=pk,
                    resource_type=resource["resourceType"],
                    param=param,
                    target=target,
                )
            )


def downgrade() -> None:
    raise NotImplementedError("downgrading below 0002 is not supported")
