"""The walking skeleton's schema (created by create_all before Alembic took over).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CURRENT = sa.text("is_current")


def upgrade() -> None:
    op.create_table(
        "resource_version",
        sa.Column("pk", sa.Integer(), primary_key=True),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("subject_ref", sa.String(200), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.UniqueConstraint("resource_type", "resource_id", "version_id"),
    )
    op.create_index(
        "ux_resource_version_current",
        "resource_version",
        ["resource_type", "resource_id"],
        unique=True,
        sqlite_where=CURRENT,
        postgresql_where=CURRENT,
    )
    op.create_index(
        "ix_resource_version_subject",
        "resource_version",
        ["subject_ref", "last_updated"],
        sqlite_where=CURRENT,
        postgresql_where=CURRENT,
    )
    op.create_table(
        "resource_identifier",
        sa.Column("pk", sa.Integer(), primary_key=True),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("system", sa.String(500), nullable=True),
        sa.Column("value", sa.String(500), nullable=False),
    )
    op.create_index(
        "ix_resource_identifier_token", "resource_identifier", ["resource_type", "system", "value"]
    )
    op.create_index(
        "ix_resource_identifier_resource", "resource_identifier", ["resource_type", "resource_id"]
    )


def downgrade() -> None:
    op.drop_table("resource_identifier")
    op.drop_table("resource_version")
