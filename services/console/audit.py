"""Every console action as a FHIR R4 ``AuditEvent`` (who, what, when, outcome), kept in the
console's audit table (``audit_url``: not the instance index, which is a cache that may be
deleted) and named, without PHI, in the ``scanwatch.console.audit`` log.

Who: the staff account (the token's ``sub``), as a ``Practitioner`` reference when the account
is a clinician's (its ``fhirUser``), else by identifier, with its roles. What: the study by its
StudyInstanceUID, or the query's filter names (never their values: a filter may hold a name).
Reads the console makes through the FHIR API are audited there too, under the same ``sub``.

The codes are DICOM's audit vocabulary (PS3.15 A.5, CID 400-403), which FHIR's AuditEvent
uses for the same events.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Engine, Index, MetaData, String, Table, Text, insert

audit_log = logging.getLogger("scanwatch.console.audit")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
#: The identifier system of a staff account (the token's ``sub``).
ACCOUNT_SYSTEM = "urn:scanwatch:account"
UID_SYSTEM = "urn:dicom:uid"

#: Event types: (code, display), from DCM.
AUTHENTICATION = ("110114", "User Authentication")
QUERY = ("110112", "Query")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
SECURITY_ALERT = ("110113", "Security Alert")
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
#: FHIR AuditEvent.action: Create, Read, Update, Delete, Execute.
READ, EXECUTE = "R", "E"
#: FHIR AuditEvent.outcome: success, minor failure (refused).
SUCCESS, REFUSED = "0", "4"

metadata = MetaData()
audit_events = Table(
    "console_audit_event",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("recorded", DateTime(timezone=True), nullable=False),
    Column("account", String(64), nullable=False),
    Column("type", String(16), nullable=False),
    Column("outcome", String(2), nullable=False),
    Column("resource", Text, nullable=False),
)
Index("ix_console_audit_event_recorded", audit_events.c.recorded)
Index("ix_console_audit_event_account", audit_events.c.account)


@dataclass(frozen=True)
class Actor:
    """Who acts: the staff account, its roles, its FHIR resource (a clinician's)."""

    account: str
    roles: tuple[str, ...]
    fhir_user: str | None = None


def audit_event(
    actor: Actor,
    event_type: tuple[str, str],
    action: str,
    outcome: str = SUCCESS,
    subtype: tuple[str, str] | None = None,
    study: str | None = None,
    query: Iterable[str] = (),
    detail: str | None = None,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """The AuditEvent resource (R4) of one console action."""
    who: dict[str, Any] = (
        {"reference": actor.fhir_user}
        if actor.fhir_user
        else {"identifier": {"system": ACCOUNT_SYSTEM, "value": actor.account}}
    )
    agent: dict[str, Any] = {
        "who": who,
        "requestor": True,
        "role": [{"text": role} for role in actor.roles],
    }
    if actor.fhir_user:
        agent["altId"] = actor.account
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": {"system": DCM, "code": event_type[0], "display": event_type[1]},
        "action": action,
        "recorded": (recorded or datetime.now(UTC)).isoformat(),
        "outcome": outcome,
        "agent": [agent],
        "source": {"observer": {"display": "scanwatch console"}},
    }
    if subtype is not None:
        event["subtype"] = [{"system": DCM, "code": subtype[0], "display": subtype[1]}]
    if detail:
        event["outcomeDesc"] = detail
    entities: list[dict[str, Any]] = []
    if study:
        entities.append(
            {
                "what": {"identifier": {"system": UID_SYSTEM, "value": f"urn:oid:{study}"}},
                "type": {"system": DCM, "code": "110180", "display": "Study Instance UID"},
            }
        )
    names = sorted(set(query))
    if names:
        entities.append({"name": "query", "description": ",".join(names)[:500]})
    if entities:
        event["entity"] = entities
    return event


class AuditTrail:
    """Records AuditEvents in ``engine`` (its table created at the first record)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ready = False

    def record(self, event: dict[str, Any]) -> None:
        """Store ``event`` (committed before it returns) and log it without PHI."""
        if not self._ready:
            metadata.create_all(self.engine)
            self._ready = True
        agent = event["agent"][0]
        account = agent.get("altId") or agent["who"].get("identifier", {}).get("value", "")
        study = next(
            (e["what"]["identifier"]["value"] for e in event.get("entity", ()) if "what" in e),
            None,
        )
        audit_log.info(
            "console action",
            extra={
                "account_id": account,
                "type": event["type"]["code"],
                "subtype": event.get("subtype", [{}])[0].get("code"),
                "action": event["action"],
                "outcome": event["outcome"],
                "study": study,
            },
        )
        with self.engine.begin() as conn:
            conn.execute(
                insert(audit_events).values(
                    id=event["id"],
                    recorded=datetime.fromisoformat(event["recorded"]),
                    account=account,
                    type=event["type"]["code"],
                    outcome=event["outcome"],
                    resource=json.dumps(event, separators=(",", ":")),
                )
            )

    def events(self, account: str | None = None) -> list[dict[str, Any]]:
        """The recorded AuditEvents, oldest first (of ``account`` when given)."""
        if not self._ready:
            metadata.create_all(self.engine)
            self._ready = True
        query = audit_events.select().order_by(audit_events.c.recorded)
        if account is not None:
            query = query.where(audit_events.c.account == account)
        with self.engine.connect() as conn:
            return [json.loads(row.resource) for row in conn.execute(query)]
