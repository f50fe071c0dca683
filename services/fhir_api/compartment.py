"""The patient compartment: what a patient-bound token may read, and the one thing it may
write. The one rule behind read, vread, search, history and create (and so behind the chatbot
and the patient portal).

A grant reaches a resource type either unrestricted (a ``system/`` or ``user/`` scope allows it)
or only within its Patient's compartment (only ``patient/`` scopes allow it). The compartment
of Patient ``p`` holds, of each type (FHIR's Patient CompartmentDefinition, for the types served):

- Patient: ``Patient/p`` itself;
- Observation, ImagingStudy, DiagnosticReport, MedicationRequest, CommunicationRequest: those
  whose ``subject`` is ``Patient/p``;
- Appointment: those with a ``participant[].actor`` that is ``Patient/p`` (at most one Patient
  participant per Appointment: :func:`check_patient_members`);
- every other type (Device, Provenance, Subscription): nothing.

:func:`compartment_reference` is the reference a resource is judged on, and the store indexes
exactly that value as ``subject_ref`` (``indexing``). :func:`compartment_of` gives the rule for
a grant and a type; :meth:`Compartment.contains` judges one stored version (read, vread,
instance history) and :meth:`Compartment.clause` is the same test in SQL (search, conditional
create) over ``subject_ref``.

Writes: patient-bound tokens never update or delete, and create only what
:data:`PATIENT_CREATE_TYPES` lists, inside their own compartment (:func:`create_rule`,
:meth:`Compartment.check_created`): the chatbot records the patient's callback request with the
patient's own token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.sql import ColumnElement
from sqlmodel import col

from services.auth.scopes import READ, WRITE, AuthError, Grant
from services.fhir_api.errors import INVALID, FhirError
from services.fhir_api.models import ResourceVersion
from services.fhir_api.resources import SUBJECT_TYPES, Stored, reference_key, subject_reference

#: Types whose compartment member is a participant: ``participant[].actor`` that is a Patient.
PARTICIPANT_TYPES = ("Appointment",)
#: Types whose resources can be in a patient's compartment; every other type's is empty.
MEMBER_TYPES = ("Patient", *SUBJECT_TYPES, *PARTICIPANT_TYPES)
#: Types a patient-bound token may create (nothing else, and never update or delete), when a
#: ``patient/`` scope allows the write (``patient/CommunicationRequest.write``) and the
#: resource is in its own compartment: the patient's "please call me back" request.
PATIENT_CREATE_TYPES = ("CommunicationRequest",)

#: Why a patient-bound token is refused a resource of its type outside its compartment.
OTHER_PATIENT = "the token is bound to another patient"
#: Why a patient-bound token is refused a write.
PATIENT_WRITE = "patient-bound tokens cannot write"


def _participant_patients(resource: dict[str, Any]) -> list[str]:
    """The ``Patient/<id>`` keys of an Appointment's participant actors, in order, once each."""
    keys: dict[str, None] = {}
    for participant in resource.get("participant") or []:
        reference = ((participant or {}).get("actor") or {}).get("reference")
        key = reference_key(reference) if reference else None
        if key is not None and key.startswith("Patient/"):
            keys[key] = None
    return list(keys)


def compartment_reference(resource: dict[str, Any]) -> str | None:
    """The ``Type/id`` a resource's compartment is judged on, which the store indexes as
    ``subject_ref``: the ``subject`` of :data:`SUBJECT_TYPES` (whatever type it names, so that
    ``subject=Group/…`` searches work; only a Patient places it in a compartment), the Patient
    participant of an Appointment; None for other types."""
    resource_type = resource.get("resourceType")
    if resource_type in SUBJECT_TYPES:
        return subject_reference(resource)
    if resource_type in PARTICIPANT_TYPES:
        patients = _participant_patients(resource)
        return patients[0] if patients else None
    return None


def check_patient_members(resource: dict[str, Any]) -> None:
    """422 for a resource that would be in more than one patient's compartment (an Appointment
    with two Patient participants): the store indexes one patient per resource, so such a
    resource would be hidden from every patient but the first."""
    if resource.get("resourceType") in PARTICIPANT_TYPES:
        patients = _participant_patients(resource)
        if len(patients) > 1:
            raise FhirError(
                422,
                f"{resource['resourceType']}.participant names {len(patients)} patients; "
                "this server stores one Patient participant per resource",
                INVALID,
            )


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
        return self.resource_type in MEMBER_TYPES

    def contains(self, stored: Stored) -> bool:
        """Whether this version is in the compartment (a deletion never is, but a deleted
        Patient's id still names the patient)."""
        if stored.resource_type != self.resource_type:
            return False
        if self.resource_type == "Patient":
            return stored.resource_id == self.patient
        if self.has_members and not stored.deleted:
            return compartment_reference(stored.resource()) == self.key
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
        if self.has_members:
            return col(ResourceVersion.subject_ref) == self.key
        raise AuthError(403, f"{self.resource_type} is outside the patient's compartment")

    def check_created(self, resource: dict[str, Any]) -> None:
        """403 unless a resource a patient-bound token creates (validated, before it is stored)
        is in this compartment and, when it names a ``requester``, the requester is this Patient
        too: a patient asks only for themself."""
        if resource.get("resourceType") != self.resource_type:
            raise AuthError(403, OTHER_PATIENT)
        if compartment_reference(resource) != self.key:
            raise AuthError(403, f"a patient-bound token creates only for {self.key}")
        if "requester" in resource:
            reference = (resource["requester"] or {}).get("reference")
            if not reference or reference_key(reference) != self.key:
                raise AuthError(403, f"a patient-bound token's requester must be {self.key}")


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
    """403 unless ``grant`` writes ``resource_type`` unrestricted (update, delete: patient-bound
    tokens never do; 403 too when no scope allows the write)."""
    if compartment_of(grant, resource_type, WRITE) is not None:
        raise AuthError(403, PATIENT_WRITE)


def create_rule(grant: Grant, resource_type: str) -> Compartment | None:
    """The rule for ``grant`` creating a ``resource_type``: None when it is unrestricted, else
    the compartment the new resource must be in (:meth:`Compartment.check_created`). 403 when no
    scope allows the write, or when only ``patient/`` scopes do and the type is not one of
    :data:`PATIENT_CREATE_TYPES`."""
    rule = compartment_of(grant, resource_type, WRITE)
    if rule is not None and resource_type not in PATIENT_CREATE_TYPES:
        raise AuthError(403, PATIENT_WRITE)
    return rule
