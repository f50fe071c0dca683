"""The patient compartment: what a patient-bound token may read. The one rule behind read,
vread, search and history (and, later, the chatbot and the patient portal).

A grant reads a resource type either unrestricted (a ``system/`` or ``user/`` scope allows it)
or only within its Patient's compartment (only ``patient/`` scopes allow it). The compartment
of Patient ``p`` holds, of each type:

- Patient: ``Patient/p`` itself;
- Observation, ImagingStudy, DiagnosticReport: those whose ``subject`` is ``Patient/p``;
- every other type (Device, Provenance, Subscription): nothing.

:func:`compartment_of` gives the rule for a grant and a type; :meth:`Compartment.contains`
judges one stored version (read, vread, instance history) and :meth:`Compartment.clause` is
the same test in SQL (search), over the ``subject_ref`` column the store indexes from the same
``subject`` (:func:`services.fhir_api.resources.subject_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.sql import ColumnElement
from sqlmodel import col

from services.auth.scopes import READ, WRITE, AuthError, Grant
from services.fhir_api.models import ResourceVersion
from services.fhir_api.resources import SUBJECT_TYPES, Stored, subject_reference

#: Why a patient-bound token is refused a resource of its type outside its compartment.
OTHER_PATIENT = "the token is bound to another patient"


@dataclass(frozen=True)
class Compartment:
    """The resources of ``resource_type`` in Patient ``patient``'s compartment."""

    resource_type: str
    patient: str

    @property
    def key(self) -> str:
        """The compartment's Patient as a reference key, ``Patient/<id>``."""
        return f"Patient/{self.patient}"

    @property
    def has_members(self) -> bool:
        """Whether any resource of this type can be in a patient's compartment."""
        return self.resource_type == "Patient" or self.resource_type in SUBJECT_TYPES

    def contains(self, stored: Stored) -> bool:
        """Whether this version is in the compartment (a deletion never is, but a deleted
        Patient's id still names the patient)."""
        if stored.resource_type != self.resource_type:
            return False
        if self.resource_type == "Patient":
            return stored.resource_id == self.patient
        if self.resource_type in SUBJECT_TYPES and not stored.deleted:
            return subject_reference(stored.resource()) == self.key
        return False

    def check(self, stored: Stored) -> None:
        """403 unless :meth:`contains` ``stored``."""
        if not self.contains(stored):
            raise AuthError(403, OTHER_PATIENT)

    def clause(self) -> ColumnElement[bool]:
        """:meth:`contains` as a condition on current ``resource_version`` rows, for a search;
        403 for a type whose compartment is empty (a search of it would only mislead)."""
        if self.resource_type == "Patient":
            return col(ResourceVersion.resource_id) == self.patient
        if self.resource_type in SUBJECT_TYPES:
            return col(ResourceVersion.subject_ref) == self.key
        raise AuthError(403, f"{self.resource_type} is outside the patient's compartment")


def compartment_of(grant: Grant, resource_type: str, access: str = READ) -> Compartment | None:
    """The rule for ``grant``'s ``access`` to ``resource_type``: None when it is unrestricted,
    else the compartment it is limited to. 403 when no scope allows that access at all."""
    grant.require(resource_type, access)
    if not grant.patient_bound(resource_type, access):
        return None
    # Only patient/ scopes allow it, and a patient/ scope is usable only with a patient.
    assert grant.patient is not None
    return Compartment(resource_type, grant.patient)


def refuse_patient_write(grant: Grant, resource_type: str) -> None:
    """403 unless ``grant`` writes ``resource_type`` unrestricted: patient-bound tokens never
    write (403 too when no scope allows the write)."""
    if compartment_of(grant, resource_type, WRITE) is not None:
        raise AuthError(403, "patient-bound tokens cannot write")
