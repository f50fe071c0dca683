"""Deterministic FHIR logical ids and identifiers.

Every write the pipeline makes is keyed on one of these, so that redelivery, retries and
re-scoring overwrite instead of duplicating (DESIGN §2, "idempotent effects").
"""

from __future__ import annotations

import hashlib
import uuid

#: Fixed namespace for scanwatch's UUIDv5 identifiers. Never change it: ids would change.
NAMESPACE = uuid.UUID("6f0f8a4e-5b0c-5d55-9a57-5ca2a7c4a7e1")

#: ``identifier.system`` values (NamingSystems) of the resources scanwatch writes.
OBSERVATION_ID_SYSTEM = "urn:scanwatch:observation"
REPORT_ID_SYSTEM = "urn:scanwatch:diagnostic-report"
DEVICE_ID_SYSTEM = "urn:scanwatch:model"
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: ``identifier.system`` of a patient's callback request (CommunicationRequest): the writer's own
#: key for one request, so that a retried create (``If-None-Exist``) does not record it twice.
CALLBACK_REQUEST_ID_SYSTEM = "urn:scanwatch:callback-request"


def _v5(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "|".join(parts)))


def observation_id(study_uid: str, model_name: str, model_version: int) -> str:
    """One Observation per (study, model name, model version): UUIDv5 of the three."""
    return _v5("Observation", study_uid, model_name, str(model_version))


def imaging_study_id(study_uid: str) -> str:
    """The ImagingStudy of a StudyInstanceUID."""
    return _v5("ImagingStudy", study_uid)


def patient_id(issuer: str | None, patient_id: str) -> str:
    """The Patient of a DICOM (IssuerOfPatientID, PatientID) pair."""
    return _v5("Patient", issuer or "", patient_id)


def device_id(model_name: str, model_version: int) -> str:
    """The Device that stands for one model version."""
    return _v5("Device", model_name, str(model_version))


def diagnostic_report_id(study_uid: str, model_name: str, model_version: int) -> str:
    """The DiagnosticReport that presents one Observation (same key as the Observation)."""
    return _v5("DiagnosticReport", study_uid, model_name, str(model_version))


def provenance_id(study_uid: str, model_name: str, model_version: int) -> str:
    """The Provenance of one AI result (same key as the Observation)."""
    return _v5("Provenance", study_uid, model_name, str(model_version))


def care_plan_id(resource_type: str, patient_id: str, key: str) -> str:
    """A care-plan resource (MedicationRequest, Appointment) that a tool writes for one Patient
    id under ``key`` (``scanwatch send-sample`` uses ``sample``): writing it again replaces it."""
    return _v5(resource_type, "care-plan", patient_id, key)


def chat_sender_id(patient_id: str) -> str:
    """The chatbot's conversation id for a Patient id (the patient channel derives it from the
    verified token): stable, and not the id itself, since conversation ids appear in Rasa's API
    and in operators' tools."""
    return "patient-" + hashlib.sha256(patient_id.encode()).hexdigest()[:24]
