"""Schema migrations: Alembic owns the FHIR store's schema (``migrations/``).

``upgrade(engine)`` brings a database to the latest revision. A database created by the
walking skeleton (tables present, no ``alembic_version``) is first stamped at revision 0001,
which describes exactly that schema, so its data is migrated rather than recreated.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SKELETON_REVISION = "0001"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head() -> str:
    """The latest revision."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: not under Alembic)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (idempotent)."""
    config = _config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "resource_version" in tables and "alembic_version" not in tables:
            log.info("stamping a skeleton database", extra={"revision": SKELETON_REVISION})
            command.stamp(config, SKELETON_REVISION)
        command.upgrade(config, revision)
    log.info("database schema up to date", extra={"revision": current(engine)})
