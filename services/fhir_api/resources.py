"""What this server stores, in FHIR's own terms: the resource types, ids and literal references,
and :class:`Stored`, a resource version as the API serves it. No database here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: Resource types served (the pipeline's; MedicationRequest, Appointment and the patient's
#: callback request, CommunicationRequest, for the chatbot and the clinician console; the
#: clinician who signs or prescribes, Practitioner; Subscription for notifications). The one
#: list: search parameters, the CapabilityStatement, OpenAPI and the
#: routes all follow it.
RESOURCE_TYPES = (
    "Patient",
    "Device",
    "ImagingStudy",
    "Observation",
    "DiagnosticReport",
    "Provenance",
    "MedicationRequest",
    "Appointment",
    "CommunicationRequest",
    "Practitioner",
    "Subscription",
)
#: Types whose ``subject`` is indexed for ``patient=``/``subject=``.
SUBJECT_TYPES = (
    "Observation",
    "ImagingStudy",
    "DiagnosticReport",
    "MedicationRequest",
    "CommunicationRequest",
)
#: The element each type's ``date=`` (and ``_sort=date``) searches, indexed as the
#: ``effective_start``/``effective_end`` range: ``effective[x]`` where the type has one, else
#: the date FHIR's own ``date``-like parameter of the type names (MedicationRequest
#: ``authoredon``, CommunicationRequest ``authored``, Appointment ``date`` = ``start``).
DATE_ELEMENTS = {
    "Observation": "effective[x]",
    "DiagnosticReport": "effective[x]",
    "MedicationRequest": "authoredOn",
    "CommunicationRequest": "authoredOn",
    "Appointment": "start",
}
#: FHIR ``id`` datatype.
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
_SERVER_META = ("versionId", "lastUpdated")


@dataclass(frozen=True)
class Stored:
    """A stored resource version as the API serves it."""

    resource_type: str
    resource_id: str
    version_id: int
    last_updated: str  # meta.lastUpdated, FHIR instant
    content: str  # JSON text; empty for a deletion
    deleted: bool = False

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def key(self) -> str:
        return f"{self.resource_type}/{self.resource_id}"

    def resource(self) -> dict[str, Any]:
        resource: dict[str, Any] = json.loads(self.content)
        return resource


def reference_key(reference: str) -> str | None:
    """``Type/id`` of a relative or absolute literal reference (a ``_history`` suffix dropped);
    None when it is not one."""
    parts = reference.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and _TYPE_RE.match(parts[-2]) and parts[-1]:
        return f"{parts[-2]}/{parts[-1]}"
    return None


def subject_reference(resource: dict[str, Any]) -> str | None:
    """``Type/id`` of the resource's ``subject`` reference, or None (the value the store indexes
    as ``subject_ref`` for :data:`SUBJECT_TYPES`)."""
    reference = (resource.get("subject") or {}).get("reference")
    return reference_key(reference) if reference else None


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without the parts the server owns (meta.versionId, meta.lastUpdated)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in _SERVER_META}
    result = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        result["meta"] = meta
    return result


def instant(moment: datetime) -> str:
    """A FHIR instant (UTC, milliseconds)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
