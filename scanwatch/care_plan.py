"""A patient's care plan and care coordination on FHIR R4: the MedicationRequest, the
Appointment and the patient's "please call me back" request (a CommunicationRequest), built as
plain resource dicts for one Patient id.

Pure functions of their arguments, standard library and ``scanwatch.ids`` only: the FHIR API's
tests, ``scanwatch send-sample --with-care-plan`` and the chatbot (whose own virtualenv has no
FHIR library) build these resources with them, and readers find them by the codes below. Each
resource validates with 0 errors under HAPI FHIR's R4 validator
(``services/fhir_api/tests/test_hapi_validator.py``).

A resource built without ``resource_id`` is for a create (``POST``: the server assigns the id);
with one, for ``PUT``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from scanwatch import ids

#: Local CodeSystem of the kinds of communication scanwatch records (same base as the
#: Observation codes, ``scanwatch.fhir_codes.CODE_SYSTEM``). HL7's communication-category
#: (alert, notification, reminder, instruction) has no code for a patient asking to be called.
COMMUNICATION_CATEGORY_SYSTEM = "urn:scanwatch:codesystem:communication-category"
#: ``CommunicationRequest.category`` of a patient's callback request.
CALLBACK_CODE = "callback-request"
CALLBACK_DISPLAY = "Patient callback request"
#: ``CommunicationRequest.priority`` values (FHIR request-priority).
PRIORITIES = ("routine", "urgent", "asap", "stat")
#: ``Appointment.appointmentType`` of a follow-up visit (HL7 v2 table 0276).
APPOINTMENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0276"
FOLLOW_UP_CODE = "FOLLOWUP"
FOLLOW_UP_DISPLAY = "A follow up visit from a previous appointment"
#: ``meta.security`` of synthetic records (v3-ActReason HTEST "test health data"): the dev seed.
TEST_DATA_SECURITY = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}

#: The dev seed of ``send-sample``: its key for :func:`scanwatch.ids.care_plan_id`, what it
#: prescribes, and when its follow-up visit is (days after the day it is written, at 10:00 UTC).
SAMPLE_KEY = "sample"
SAMPLE_MEDICATION = "Levetiracetam 500 mg oral tablet"
SAMPLE_DOSAGE = "500 mg by mouth twice a day"
SAMPLE_VISIT = "Follow-up visit to discuss the MRI result"
SAMPLE_FOLLOW_UP_DAYS = 14
SAMPLE_VISIT_TIME = time(10, 0, tzinfo=UTC)
SAMPLE_VISIT_MINUTES = 30


def instant(moment: datetime) -> str:
    """A FHIR instant/dateTime with a zone, in UTC (seconds). Naive datetimes are refused: a
    clinical time without a zone is ambiguous."""
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone")
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def patient_reference(patient_id: str) -> dict[str, str]:
    """``{"reference": "Patient/<id>"}``."""
    return {"reference": f"Patient/{patient_id}"}


def _head(resource_type: str, resource_id: str | None) -> dict[str, Any]:
    head: dict[str, Any] = {"resourceType": resource_type}
    if resource_id is not None:
        head["id"] = resource_id
    return head


def medication_request(
    patient_id: str,
    *,
    medication: str,
    dosage: str,
    authored_on: datetime,
    status: str = "active",
    intent: str = "order",
    requester: dict[str, str] | None = None,
    resource_id: str | None = None,
) -> dict[str, Any]:
    """A MedicationRequest of ``patient_id``: ``medication`` and ``dosage`` as text (a coding,
    when the clinician console writes one, goes beside the text), ``requester`` a Reference
    (``{"reference": "Practitioner/…"}`` or ``{"display": …}``)."""
    resource = _head("MedicationRequest", resource_id) | {
        "status": status,
        "intent": intent,
        "medicationCodeableConcept": {"text": medication},
        "subject": patient_reference(patient_id),
        "authoredOn": instant(authored_on),
        "dosageInstruction": [{"text": dosage}],
    }
    if requester is not None:
        resource["requester"] = dict(requester)
    return resource


def appointment(
    patient_id: str,
    *,
    start: datetime,
    minutes: int,
    description: str,
    status: str = "booked",
    follow_up: bool = True,
    with_whom: dict[str, str] | None = None,
    resource_id: str | None = None,
) -> dict[str, Any]:
    """An Appointment of ``patient_id`` (its one Patient participant, accepted) from ``start``
    for ``minutes``; ``follow_up`` types it as a follow-up visit; ``with_whom`` is the other
    participant's Reference (a clinician, a clinic)."""
    if minutes < 1:
        raise ValueError(f"minutes must be at least 1, got {minutes}")
    participants: list[dict[str, Any]] = [
        {"actor": patient_reference(patient_id), "status": "accepted"}
    ]
    if with_whom is not None:
        participants.append({"actor": dict(with_whom), "status": "accepted"})
    resource = _head("Appointment", resource_id) | {"status": status}
    if follow_up:
        resource["appointmentType"] = {
            "coding": [
                {
                    "system": APPOINTMENT_TYPE_SYSTEM,
                    "code": FOLLOW_UP_CODE,
                    "display": FOLLOW_UP_DISPLAY,
                }
            ]
        }
    return resource | {
        "description": description,
        "start": instant(start),
        "end": instant(start + timedelta(minutes=minutes)),
        "minutesDuration": minutes,
        "participant": participants,
    }


def callback_request(
    patient_id: str,
    *,
    authored_on: datetime,
    reason: str | None = None,
    priority: str = "routine",
    recipient: dict[str, str] | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """The patient's "please call me back" request: an active CommunicationRequest whose
    ``subject`` and ``requester`` are the Patient, ``category`` :data:`CALLBACK_CODE`,
    ``payload[].contentString`` the patient's ``reason`` (optional), ``recipient`` an optional
    Reference (the care team). ``key`` (the writer's own id of this request, such as a
    conversation turn) becomes an identifier of :data:`scanwatch.ids.CALLBACK_REQUEST_ID_SYSTEM`,
    so a retried ``POST`` with ``If-None-Exist: identifier=<system>|<key>`` records it once.

    This is what a patient-bound token may create (the FHIR API's ``compartment.py``)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    resource: dict[str, Any] = {"resourceType": "CommunicationRequest"}
    if key is not None:
        resource["identifier"] = [{"system": ids.CALLBACK_REQUEST_ID_SYSTEM, "value": key}]
    resource |= {
        "status": "active",
        "category": [
            {
                "coding": [
                    {
                        "system": COMMUNICATION_CATEGORY_SYSTEM,
                        "code": CALLBACK_CODE,
                        "display": CALLBACK_DISPLAY,
                    }
                ],
                "text": CALLBACK_DISPLAY,
            }
        ],
        "priority": priority,
        "subject": patient_reference(patient_id),
    }
    if reason:
        resource["payload"] = [{"contentString": reason}]
    resource["authoredOn"] = instant(authored_on)
    resource["requester"] = patient_reference(patient_id)
    if recipient is not None:
        resource["recipient"] = [dict(recipient)]
    return resource


def sample_care_plan(patient_id: str, *, prescribed: datetime, today: date) -> list[dict[str, Any]]:
    """The dev seed for the sample's patient: one active MedicationRequest authored at
    ``prescribed`` and one booked follow-up Appointment :data:`SAMPLE_FOLLOW_UP_DAYS` after
    ``today``, both marked as test data and with ids from :func:`scanwatch.ids.care_plan_id`,
    so that writing them again (``PUT``) the same day changes nothing, and on a later day moves
    the visit forward instead of adding one."""
    security = {"meta": {"security": [dict(TEST_DATA_SECURITY)]}}
    visit = datetime.combine(today + timedelta(days=SAMPLE_FOLLOW_UP_DAYS), SAMPLE_VISIT_TIME)
    medication = medication_request(
        patient_id,
        medication=SAMPLE_MEDICATION,
        dosage=SAMPLE_DOSAGE,
        authored_on=prescribed,
        resource_id=ids.care_plan_id("MedicationRequest", patient_id, SAMPLE_KEY),
    )
    visit_resource = appointment(
        patient_id,
        start=visit,
        minutes=SAMPLE_VISIT_MINUTES,
        description=SAMPLE_VISIT,
        resource_id=ids.care_plan_id("Appointment", patient_id, SAMPLE_KEY),
    )
    return [
        _with_security(medication, security),
        _with_security(visit_resource, security),
    ]


def _with_security(resource: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    head = {k: resource[k] for k in ("resourceType", "id") if k in resource}
    return head | meta | {k: v for k, v in resource.items() if k not in head}
