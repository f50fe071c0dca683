"""The CapabilityStatement and SMART discovery document: exactly what this server implements,
generated from the same tables the search code uses."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from services.auth import smart
from services.auth.routes import TOKEN_PATH
from services.fhir_api.compartment import PATIENT_CREATE_TYPES
from services.fhir_api.config import Settings
from services.fhir_api.resources import RESOURCE_TYPES
from services.fhir_api.search import INCLUDES, REVINCLUDES, SEARCH_PARAMS, SORT_KEYS

#: FHIR version on the wire (R4); resources are validated with the R4B models, whose
#: structures the resources written here share with R4.
FHIR_VERSION = "4.0.1"
SOFTWARE_NAME = "scanwatch FHIR API"
#: Interactions every supported type has.
INTERACTIONS = (
    "read",
    "vread",
    "update",
    "create",
    "delete",
    "history-instance",
    "history-type",
    "search-type",
)
SMART_EXTENSION = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SMART_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"


def _software_version() -> str:
    try:
        return version("scanwatch")
    except PackageNotFoundError:
        return "0.0.0"


def issuer_root(base_url: str) -> str:
    """The authorization server's root for a FHIR base URL (``.../fhir`` → ``...``)."""
    return base_url[: -len("/fhir")] if base_url.endswith("/fhir") else base_url


def token_url(base_url: str) -> str:
    """The token endpoint for a FHIR base URL (``.../fhir`` → ``.../auth/token``)."""
    return f"{issuer_root(base_url)}{TOKEN_PATH}"


def _resource(resource_type: str, max_count: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": resource_type,
        "interaction": [{"code": code} for code in INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-match",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": [
            {"name": p.name, "type": p.kind, "documentation": p.doc}
            for p in SEARCH_PARAMS[resource_type]
        ],
        "documentation": (
            f"_sort by {', '.join(sorted(SORT_KEYS[resource_type]))} ('-' for descending, "
            f"several keys comma-separated); _count up to {max_count}; paging with _offset "
            "(next/previous links); _total=none|estimate|accurate. Unknown parameters, "
            "modifiers and prefixes answer 400."
        ),
    }
    if resource_type in PATIENT_CREATE_TYPES:
        entry["documentation"] += (
            f" A patient-bound token with patient/{resource_type}.write may create one whose "
            "subject (and requester, when present) is its own Patient; it never updates or "
            "deletes."
        )
    if includes := [k for k, (source, _) in INCLUDES.items() if source == resource_type]:
        entry["searchInclude"] = includes
    if resource_type in ("Observation", "DiagnosticReport", "ImagingStudy", "Device", "Patient"):
        entry["searchRevInclude"] = list(REVINCLUDES)
    return entry


def capability_statement(
    base_url: str, date: str, settings: Settings, auth_required: bool, issuer: str | None = None
) -> dict[str, Any]:
    """The server's CapabilityStatement (kind ``instance``) for ``base_url``; its SMART
    endpoints are those of ``issuer`` (default: the base URL's root)."""
    urls = smart.endpoints(issuer or issuer_root(base_url))
    rest: dict[str, Any] = {
        "mode": "server",
        "resource": [_resource(t, settings.max_count) for t in RESOURCE_TYPES],
        "interaction": [
            {
                "code": "transaction",
                "documentation": "POST [base] with a transaction Bundle: every entry is "
                "written or none is, and a refusal names its entry. Entries: PUT Type/id "
                "(request.ifMatch; request.ifNoneMatch * creates only), PUT Type?search "
                "(conditional update: one match updated, none created, several 412), POST Type "
                "(id assigned; request.ifNoneExist: conditional create, one match answered "
                "200 and not written, several 412). References to an entry's fullUrl "
                "(urn:uuid:, urn:oid:) are rewritten to the id it was given; conditional "
                "references (Type?search) to the one stored match (412 for none or several). "
                "POST entries are processed before PUT entries; the transaction-response "
                "lists status, location, etag and lastModified per entry in request order. "
                "Every entry passes the scope and patient-compartment checks of the single "
                "interaction. A clinician's review signs this way; the pipeline writes each "
                "scored study this way. DELETE, GET and PATCH entries and batch: not "
                "implemented.",
            }
        ],
    }
    if auth_required:
        rest["security"] = {
            "extension": [
                {
                    "url": SMART_EXTENSION,
                    "extension": [
                        {"url": "token", "valueUri": urls["token"]},
                        {"url": "authorize", "valueUri": urls["authorize"]},
                        {"url": "revoke", "valueUri": urls["revoke"]},
                    ],
                }
            ],
            "service": [{"coding": [{"system": SMART_SERVICE, "code": "SMART-on-FHIR"}]}],
            "description": "Bearer JWT access tokens with SMART scopes (system/*.read, "
            "patient/Observation.read, patient/*.read, system/*.write, "
            "patient/CommunicationRequest.write, user/<Type>.write for a signed-in "
            "clinician, whose fhirUser Practitioner is recorded as the author): backend "
            "services by client credentials, "
            "patients' apps by SMART standalone launch (authorization code with PKCE S256, "
            ".well-known/smart-configuration); patient/ scopes reach only the token's "
            "patient's compartment; only /metadata is public.",
        }
    else:
        rest["documentation"] = "Authorization is off (development on loopback only)."
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": SOFTWARE_NAME, "version": _software_version()},
        "implementation": {"description": "scanwatch AI results store", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [rest],
    }


def smart_configuration(issuer: str) -> dict[str, Any]:
    """``.well-known/smart-configuration`` of the authorization server at ``issuer``."""
    return smart.smart_configuration(issuer)
