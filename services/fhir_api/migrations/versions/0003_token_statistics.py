"""Extended statistics on the token index columns (PostgreSQL).

``resource_type``, ``param``, ``system`` and ``code`` of ``search_token`` are strongly
correlated (every Observation carries the same ``code`` token). Without multivariate statistics
PostgreSQL multiplies their selectivities and underestimates a common code by ~20x
(60,000 estimated vs 1,000,000 actual rows at a million Observations), which steers the join
plans of ``code=`` searches (bench/fhir.md). SQLite has no equivalent; nothing to do there.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STATISTICS = "st_search_token_value"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE STATISTICS IF NOT EXISTS {STATISTICS} (dependencies, mcv) "
            "ON resource_type, param, system, code FROM search_token"
        )
        op.execute("ANALYZE search_token")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP STATISTICS IF EXISTS {STATISTICS}")
