"""What a clinician's token may write, and how the author is recorded (issue 17, point 5).

A write that only a ``user/`` scope allows is a signed-in staff member's: it must be a
clinician's and carry a ``fhirUser`` naming a Practitioner (403 otherwise), and the
resource's author element names that Practitioner: filled in when absent, 403 when it names
another (a clinician signs only as themself). With such a write, the clinician's minimal
Practitioner is created if absent (:func:`scanwatch.clinical_review.practitioner`). A clinician
updates an existing resource only with ``If-Match`` (428 otherwise: :func:`require_if_match`).

Every write, whoever makes it, passes :func:`scanwatch.clinical_review.check_signed`: a signed
report without a conclusion, or a signed AI result whose class is not one of the model's, is a
422 naming the field.
"""

from __future__ import annotations

from typing import Any

from scanwatch.clinical_review import ReviewError, Signer, check_signed, practitioner
from services.auth.scopes import CLINICIAN, WRITE, AuthError, Grant
from services.fhir_api.errors import INVALID, FhirError
from services.fhir_api.resources import reference_key
from services.fhir_api.store import ABSENT

#: The elements that name who wrote a resource of each type (lists or single References).
AUTHOR_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("performer",),
    "DiagnosticReport": ("resultsInterpreter",),
    "MedicationRequest": ("requester",),
    "CommunicationRequest": ("sender",),
    "Provenance": ("agent", "signature"),
}
#: Of those, the ones filled with the clinician when absent (Provenance must name them itself).
FILLED = {"Observation", "DiagnosticReport", "MedicationRequest", "CommunicationRequest"}


def writes_as_user(grant: Grant, resource_type: str) -> bool:
    """Whether only ``user/`` scopes let ``grant`` write ``resource_type`` (a staff member's
    write, not a backend's)."""
    usable = [s for s in grant.usable_scopes if s.allows(resource_type, WRITE)]
    return bool(usable) and all(s.context == "user" for s in usable)


def signer_of(grant: Grant) -> Signer:
    """The clinician a ``user/`` write is recorded as (403 without the clinician role or a
    Practitioner ``fhirUser``: the scopes of a role are narrowed at sign-in, and this keeps an
    operator's token from writing clinical records even if it were given a write scope)."""
    if CLINICIAN not in grant.roles:
        raise AuthError(403, "only a clinician writes clinical records")
    fhir_user = grant.fhir_user or ""
    if not fhir_user.startswith("Practitioner/") or reference_key(fhir_user) != fhir_user:
        raise AuthError(403, "a staff member writes only with a fhirUser that is a Practitioner")
    return Signer(fhir_user)


def _author_references(resource: dict[str, Any], element: str) -> list[dict[str, Any]]:
    value = resource.get(element)
    items = value if isinstance(value, list) else [value] if value else []
    if resource["resourceType"] == "Provenance":  # agent[].who, signature[].who
        return [item["who"] for item in items if isinstance(item.get("who"), dict)]
    return [item for item in items if isinstance(item, dict)]


def check_author(grant: Grant, resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` with its author recorded as the token's Practitioner, for a ``user/``
    write; 403 when it names another Practitioner as its author."""
    resource_type = resource["resourceType"]
    if not writes_as_user(grant, resource_type):
        return resource
    signer = signer_of(grant)
    named: list[dict[str, Any]] = []
    for element in AUTHOR_ELEMENTS.get(resource_type, ()):
        for reference in _author_references(resource, element):
            key = reference_key(reference.get("reference") or "")
            if key is not None and key.startswith("Practitioner/"):
                if key != signer.fhir_user:
                    raise AuthError(
                        403, f"{resource_type}.{element} names another Practitioner than the token"
                    )
                named.append(reference)
    if resource_type == "Provenance" and not named:
        raise AuthError(403, "a clinician's Provenance names them (agent.who = fhirUser)")
    if not named and resource_type in FILLED:
        element = AUTHOR_ELEMENTS[resource_type][0]
        single = resource_type in ("MedicationRequest", "CommunicationRequest")
        resource = {**resource, element: signer.reference() if single else [signer.reference()]}
    return resource


def require_if_match(
    grant: Grant, writes: list[tuple[dict[str, Any], int | None]]
) -> list[tuple[dict[str, Any], int | None]]:
    """``writes`` where a clinician's write without ``If-Match`` may only create
    (``store.ABSENT``: replacing an existing resource is then a 428, judged in the write's own
    transaction): a clinician never overwrites a version they have not seen."""
    checked = []
    for resource, version in writes:
        if version is None and writes_as_user(grant, resource["resourceType"]):
            version = ABSENT
        checked.append((resource, version))
    return checked


def check_signed_result(resource: dict[str, Any]) -> None:
    """422 naming the field for a signed result that cannot be signed."""
    try:
        check_signed(resource)
    except ReviewError as exc:
        raise FhirError(422, str(exc), INVALID) from exc


def practitioner_of(grant: Grant) -> dict[str, Any]:
    """The minimal Practitioner of a ``user/`` token (created if absent)."""
    return practitioner(signer_of(grant), account=grant.client_id)
