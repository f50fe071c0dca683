"""SMART-style scopes and the grant a verified token carries.

Scopes follow SMART App Launch v1: ``<context>/<resourceType|*>.<read|write|*>`` with context
``system`` (a backend: the EHR, the pipeline), ``patient`` (bound to one Patient by the
token's ``patient`` claim: the chatbot, the patient page) or ``user`` (a signed-in staff
member, whose token names them in ``sub`` and their roles in ``roles``). A ``patient`` scope
never reaches outside that patient's compartment (the FHIR API's ``compartment`` module says
what is in it).

What each staff role may be granted is written once here (:data:`ROLE_SCOPES`): the
authorization server narrows a staff sign-in's ``user/`` scopes to it, and the console checks
roles against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

READ = "read"
WRITE = "write"
CONTEXTS = ("system", "patient", "user")
_SCOPE_RE = re.compile(r"^(system|patient|user)/(\*|[A-Z][A-Za-z]+)\.(read|write|\*)$")
#: Scopes that are not resource access (accepted in requests, never required).
NON_RESOURCE_SCOPES = frozenset({"launch/patient", "openid", "fhirUser", "offline_access"})


#: Staff roles (``services.auth.accounts.STAFF_ROLES`` is this tuple).
CLINICIAN = "clinician"
OPERATOR = "operator"
ADMIN = "admin"
STAFF_ROLES = (CLINICIAN, OPERATOR, ADMIN)
#: The clinical resources a clinician writes (review, prescription, follow-up, the answer to
#: a callback request, the review's Provenance); every other type only reads.
CLINICIAN_WRITES = (
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "Appointment",
    "CommunicationRequest",
    "Provenance",
)
#: The ``user/`` scopes each staff role may be granted.
#:
#: - clinician: reads every record, writes the clinical resources of a review and its care
#:   plan (:data:`CLINICIAN_WRITES`);
#: - operator: sees what came in and what failed, and the models: the imaging metadata
#:   (ImagingStudy), the AI results (Observation) and the model records (Device), read only:
#:   no care plans, no reports, no write to any clinical resource;
#: - admin: manages staff accounts (in the authorization server, not over FHIR): no FHIR
#:   access at all.
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    CLINICIAN: ("user/*.read", *(f"user/{t}.write" for t in CLINICIAN_WRITES)),
    OPERATOR: ("user/ImagingStudy.read", "user/Observation.read", "user/Device.read"),
    ADMIN: (),
}


def role_scopes(roles: Iterable[str]) -> tuple[str, ...]:
    """The ``user/`` scopes ``roles`` together may be granted (unknown roles grant nothing)."""
    return tuple(dict.fromkeys(s for r in roles for s in ROLE_SCOPES.get(r, ())))


class AuthError(Exception):
    """401 (``invalid_token``) or 403 (``insufficient_scope``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def www_authenticate(self) -> str:
        error = "insufficient_scope" if self.status == 403 else "invalid_token"
        return f'Bearer realm="scanwatch", error="{error}"'


@dataclass(frozen=True)
class Scope:
    """One resource scope: ``context/resource_type.access``."""

    context: str
    resource_type: str  # a type or "*"
    access: str  # read, write or *

    @classmethod
    def parse(cls, text: str) -> Scope:
        match = _SCOPE_RE.match(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not a scope of the form <system|patient|user>/<Type|*>.<read|write|*>"
            )
        context, resource_type, access = match.groups()
        return cls(context, resource_type, access)

    def allows(self, resource_type: str, access: str) -> bool:
        return self.resource_type in ("*", resource_type) and self.access in ("*", access)

    def __str__(self) -> str:
        return f"{self.context}/{self.resource_type}.{self.access}"


def parse_scopes(text: str) -> tuple[Scope, ...]:
    """The resource scopes of a space-separated scope string (non-resource scopes skipped)."""
    return tuple(
        Scope.parse(item) for item in text.split() if item and item not in NON_RESOURCE_SCOPES
    )


@dataclass(frozen=True)
class Grant:
    """What the bearer of a verified token may do."""

    client_id: str  # the token's sub: the client, or the signed-in staff account
    scopes: tuple[Scope, ...]
    patient: str | None = None  # the Patient id patient/ scopes are bound to
    token_id: str | None = None
    #: A staff member's roles (the token's ``roles`` claim); empty for any other token.
    roles: tuple[str, ...] = ()
    #: The token's ``fhirUser`` (``Practitioner/<id>`` for a clinician), if any.
    fhir_user: str | None = None

    @property
    def staff(self) -> bool:
        """Whether the token is a signed-in staff member's (roles, ``user/`` scopes only)."""
        return (
            bool(self.roles)
            and self.patient is None
            and all(s.context == "user" for s in self.scopes)
        )

    def allows(self, resource_type: str, access: str) -> bool:
        return any(s.allows(resource_type, access) for s in self.usable_scopes)

    @property
    def usable_scopes(self) -> tuple[Scope, ...]:
        # A patient/ scope without a patient to bind it to grants nothing.
        return tuple(s for s in self.scopes if s.context != "patient" or self.patient)

    def patient_bound(self, resource_type: str, access: str) -> bool:
        """Whether access to ``resource_type`` is limited to :attr:`patient`'s compartment
        (only patient/ scopes allow it)."""
        return not any(
            s.allows(resource_type, access) for s in self.usable_scopes if s.context != "patient"
        )

    def require(self, resource_type: str, access: str) -> None:
        if not self.allows(resource_type, access):
            raise AuthError(
                403, f"the token's scopes do not allow {access} access to {resource_type}"
            )


#: The grant used when authorization is off (development on loopback only).
OPEN_GRANT = Grant("anonymous", (Scope("system", "*", "*"),))
