"""Alembic environment of the FHIR store. Run through :mod:`services.fhir_api.migrate`, which
hands over an open connection (``config.attributes["connection"]``)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from services.auth import accounts, clients, store  # noqa: F401 - registers the auth tables
from services.fhir_api import models  # noqa: F401 - registers the FHIR store's tables

target_metadata = SQLModel.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `scanwatch-fhir-api migrate` (services.fhir_api.migrate)"
    )

context.configure(
    connection=connection,
    target_metadata=target_metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
