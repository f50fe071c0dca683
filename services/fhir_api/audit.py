"""The read audit: who read what, when, in ``audit_event`` and the ``scanwatch.fhir.audit``
log. No PHI (:class:`services.fhir_api.models.AuditEvent`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.engine import Connection
from starlette.datastructures import QueryParams

from services.auth.scopes import Grant
from services.fhir_api.models import AuditEvent
from services.fhir_api.store import ResourceStore

audit_log = logging.getLogger("scanwatch.fhir.audit")

#: Answers whose id names no stored resource: the id is whatever the client put in the URL
#: (an integration engine that sends a patient's MRN as the Patient id would write the MRN to
#: the log and the table), so it is not recorded. Ids of stored resources are server-made
#: pseudonyms (``scanwatch.ids``), recorded like UIDs (SECURITY.md, "Logging").
ID_NOT_RECORDED = frozenset({400, 404})


def record_audit(
    connection: Connection,
    grant: Grant,
    interaction: str,
    resource_type: str | None,
    resource_id: str | None,
    parameters: Iterable[str],
    status: int,
    returned: int,
) -> None:
    """Record one read in ``audit_event`` (committed before it returns) and the audit log.

    ``connection`` may be the one the read itself used (one pool checkout per request); a
    transaction it has open for the read is ended first, so the insert starts a short write
    transaction of its own (SQLite: never an upgrade of a read snapshot)."""
    names = ",".join(sorted(set(parameters)))[:500] or None
    if status in ID_NOT_RECORDED:
        resource_id = None
    audit_log.info(
        "fhir read",
        extra={
            "client_id": grant.client_id,
            "interaction": interaction,
            "resourceType": resource_type,
            "id": resource_id,
            "parameters": names,
            "status": status,
            "returned": returned,
        },
    )
    if connection.in_transaction():
        connection.rollback()
    connection.execute(
        _AUDIT_INSERT,
        {
            "recorded": datetime.now(UTC),
            "client_id": grant.client_id,
            "token_id": grant.token_id,
            "interaction": interaction,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "parameters": names,
            "status": status,
            "returned": returned,
        },
    )
    connection.commit()


# A plain Core insert: no ORM object per read.
_AUDIT_INSERT = AuditEvent.__table__.insert()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Audit:
    """The audit of one request: ``grant``'s reads, with the names of its ``params``."""

    store: ResourceStore
    grant: Grant
    params: QueryParams
    enabled: bool = True

    def __call__(
        self,
        interaction: str,
        resource_type: str | None,
        resource_id: str | None,
        status: int,
        returned: int,
        connection: Connection | None = None,
    ) -> None:
        """Record one read (on ``connection`` when given: the one the read used)."""
        if not self.enabled:
            return
        names = (name for name, _ in self.params.multi_items())
        args = (self.grant, interaction, resource_type, resource_id, names, status, returned)
        if connection is not None:
            record_audit(connection, *args)
            return
        with self.store.reading() as own:
            record_audit(own, *args)
