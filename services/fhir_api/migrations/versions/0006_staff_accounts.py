"""Staff accounts (services/auth): an activation link may open a staff account created
beforehand (``account_invite.account_id``) instead of a patient's (``patient`` now optional).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_invite") as batch:
        batch.alter_column("patient", existing_type=sa.String(64), nullable=True)
        batch.add_column(sa.Column("account_id", sa.String(32), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM account_invite WHERE patient IS NULL")
    with op.batch_alter_table("account_invite") as batch:
        batch.drop_column("account_id")
        batch.alter_column("patient", existing_type=sa.String(64), nullable=False)
