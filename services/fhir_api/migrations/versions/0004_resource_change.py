"""The subscription notifier's outbox: one ``resource_change`` row per new version.

A write inserts the row in the same transaction as the version, so a change is never lost
between the write and its notification, whichever API process took the write; the one process
that runs the notifier (see ``subscriptions.py``) reads the rows in order and deletes them once
handled.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BIG_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "resource_change",
        sa.Column("pk", BIG_PK, primary_key=True),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("resource_change")
