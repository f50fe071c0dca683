"""The CapabilityStatement: exactly what this server implements, nothing more."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from services.fhir_api.store import SUPPORTED_TYPES

#: FHIR version on the wire (R4); resources are validated with the R4B models, whose
#: structures the resources written here share with R4.
FHIR_VERSION = "4.0.1"
SOFTWARE_NAME = "scanwatch FHIR API"

#: Search parameters implemented per resource type: (name, type, documentation).
SEARCH_PARAMS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "Observation": (
        ("patient", "reference", "Patient id or Patient/<id>; comma-separated values are OR."),
        ("subject", "reference", "<Type>/<id> (a bare id means Patient/<id>)."),
    ),
}


def _software_version() -> str:
    try:
        return version("scanwatch")
    except PackageNotFoundError:
        return "0.0.0"


def _resource(resource_type: str, max_count: int) -> dict[str, Any]:
    interactions = ["read", "update"]
    entry: dict[str, Any] = {
        "type": resource_type,
        "versioning": "versioned",  # versionId and ETag kept; If-Match not yet supported
        "readHistory": False,
        "updateCreate": True,
        "conditionalCreate": False,
        "conditionalRead": "not-match",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
    }
    if params := SEARCH_PARAMS.get(resource_type):
        interactions.append("search-type")
        entry["searchParam"] = [
            {"name": name, "type": kind, "documentation": doc} for name, kind, doc in params
        ]
        entry["documentation"] = (
            f"Search results are newest first (by lastUpdated); _count is honoured up to "
            f"{max_count}; no paging links yet. Other search parameters answer 501, unknown "
            "ones 400."
        )
    entry["interaction"] = [{"code": code} for code in interactions]
    return entry


def capability_statement(base_url: str, date: str, max_count: int) -> dict[str, Any]:
    """The server's CapabilityStatement (kind ``instance``) for ``base_url``."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": SOFTWARE_NAME, "version": _software_version()},
        "implementation": {
            "description": "scanwatch AI results store (walking skeleton)",
            "url": base_url,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "No authentication yet: run on loopback or behind an "
                "authenticating proxy. Not implemented interactions answer 501 with an "
                "OperationOutcome.",
                "resource": [_resource(t, max_count) for t in SUPPORTED_TYPES],
            }
        ],
    }
