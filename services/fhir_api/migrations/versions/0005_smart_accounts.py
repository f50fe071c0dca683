"""SMART sign-in and patient accounts (services/auth): registered clients gain redirect URIs,
grant types and public/confidential; accounts, their invitations, authorization codes and
refresh tokens (each secret only as its SHA-256 or argon2 hash).

The clients registered before this revision are backend services: client credentials only,
confidential.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("oauth_client") as batch:
        batch.add_column(sa.Column("redirect_uris", sa.Text(), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("grant_types", sa.Text(), nullable=False, server_default="client_credentials")
        )
        batch.add_column(
            sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "account",
        sa.Column("account_id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(64), nullable=True, unique=True),
        sa.Column("roles", sa.Text(), nullable=True),
        sa.Column("totp_secret", sa.String(64), nullable=True),
        sa.Column("totp_last_step", sa.Integer(), nullable=True),
        sa.Column("failed_signins", sa.Integer(), nullable=False),
        sa.Column("locked_until", MOMENT, nullable=True),
        sa.Column("created", MOMENT, nullable=False),
        sa.Column("password_changed", MOMENT, nullable=False),
        sa.Column("last_signin", MOMENT, nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "account_invite",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("patient", sa.String(64), nullable=False),
        sa.Column("created", MOMENT, nullable=False),
        sa.Column("expires", MOMENT, nullable=False),
        sa.Column("used", MOMENT, nullable=True),
    )
    op.create_index("ix_account_invite_patient", "account_invite", ["patient"])
    op.create_table(
        "oauth_authorization_code",
        sa.Column("code_sha256", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(100), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("code_challenge_method", sa.String(16), nullable=False),
        sa.Column("nonce", sa.Text(), nullable=True),
        sa.Column("auth_time", sa.Integer(), nullable=False),
        sa.Column("family", sa.String(32), nullable=False),
        sa.Column("expires", MOMENT, nullable=False),
        sa.Column("used", MOMENT, nullable=True),
    )
    op.create_table(
        "oauth_refresh_token",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("family", sa.String(32), nullable=False),
        sa.Column("client_id", sa.String(100), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("issued", MOMENT, nullable=False),
        sa.Column("expires", MOMENT, nullable=False),
        sa.Column("replaced", MOMENT, nullable=True),
        sa.Column("revoked", MOMENT, nullable=True),
    )
    op.create_index("ix_oauth_refresh_token_family", "oauth_refresh_token", ["family"])
    op.create_index("ix_oauth_refresh_token_account_id", "oauth_refresh_token", ["account_id"])


def downgrade() -> None:
    for table in ("oauth_refresh_token", "oauth_authorization_code", "account_invite", "account"):
        op.drop_table(table)
    with op.batch_alter_table("oauth_client") as batch:
        for column in ("public", "grant_types", "redirect_uris"):
            batch.drop_column(column)
