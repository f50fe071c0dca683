"""FHIR R4 resources for one scored study (DESIGN §6): Patient, Device, ImagingStudy, Observation;
and, before the model has answered, the Patient and the ImagingStudy of a study received but not
yet scored (status ``registered``), so that a patient asking early learns it arrived.

Pure functions, no I/O. Every builder returns a JSON-ready dict that is valid for the
``fhir.resources.R4B`` model of its type and already in that model's canonical form (the form
the FHIR API stores and returns), so a resource built twice from the same :class:`ScoredStudy`
is byte-for-byte the same (the FHIR API then stores no new version), and one read back from the
store compares equal to one built again (:func:`inference_worker.adapters.fhir_writer.
same_result`). The builders do not run the R4B models themselves: that round trip was a fifth of
the worker's CPU per study, the FHIR API validates every write, and
``inference_worker/tests/test_fhir_resources.py`` checks every builder, on many studies, for
validity and canonical form. Logical ids come from :mod:`scanwatch.ids`, which makes every write an
idempotent ``PUT``.

The resources carry PHI (patient name, birth date): they go to the FHIR store only, never to
logs or events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any
from urllib.parse import quote

from scanwatch import ids
from scanwatch.fhir_codes import (
    ABNORMAL,
    ANOMALY_SCORE_CODE,
    ANOMALY_SCORE_DISPLAY,
    CLASS_SYSTEM,
    CODE_SYSTEM,
    DCM_SYSTEM,
    FINDING_CODE,
    INTERPRETATION_SYSTEM,
    NORMAL,
    PROBABILITY_CODE_PREFIX,
    REPORT_CODE,
    REPORT_DISPLAY,
    STRONGEST_SLICE_CODE,
    STRONGEST_SLICE_DISPLAY,
    STRONGEST_SLICE_FRAME_CODE,
    STRONGEST_SLICE_FRAME_DISPLAY,
    STRONGEST_SLICE_SCORE_CODE,
    STRONGEST_SLICE_SCORE_DISPLAY,
    STUDY_RULE_CODE,
    STUDY_RULE_DISPLAY,
)
from schemas.model_signature import NORMAL_CLASS

# --- Code systems and codes (the AI result's own codes: scanwatch.fhir_codes) ----------------

#: ``Patient.identifier.system`` for a PatientID without IssuerOfPatientID; with an issuer the
#: system is ``<this>:<issuer, percent-encoded>``.
PATIENT_ID_SYSTEM = "urn:scanwatch:patient-id"
#: ``identifier.system`` of DICOM AccessionNumber values.
ACCESSION_SYSTEM = "urn:scanwatch:accession"

UCUM_SYSTEM = "http://unitsofmeasure.org"
UCUM_UNITY = "1"
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AI_ASSERTED = "AIAST"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
CATEGORY_IMAGING = "imaging"
V2_0203_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACCESSION_TYPE = "ACSN"
MEDICAL_RECORD_TYPE = "MR"
AI_DEVICE_TYPE_SYSTEM = "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS"
AI_DEVICE_TYPE = "Artificial-Intelligence"

#: DiagnosticReport category (HL7 v2 table 0074).
V2_0074_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0074"
RADIOLOGY = "RAD"
DATA_OPERATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"

OBSERVATION_STATUS = "preliminary"  # AI output, not reviewed by a clinician
IMAGING_STUDY_STATUS = "available"
#: An ImagingStudy received but not scored yet ("nothing yet available", FHIR R4).
REGISTERED_STATUS = "registered"
DEVICE_STATUS = "active"

#: DICOM PatientSex (PS3.3 C.7.1.1) → FHIR administrative gender.
GENDER = {"M": "male", "F": "female", "O": "other"}


# --- Input -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredSeries:
    """The series that was scored (DICOM keywords verbatim)."""

    SeriesInstanceUID: str
    Modality: str
    NumberOfSeriesRelatedInstances: int
    SeriesDescription: str | None = None
    SeriesNumber: int | None = None


@dataclass(frozen=True)
class HeatmapSeriesRef:
    """The study's AI heatmap series in the file store (``inference_worker.heatmaps``): listed
    in the ImagingStudy that the Observation is ``derivedFrom``, so that a viewer finds it."""

    SeriesInstanceUID: str
    SOPInstanceUIDs: tuple[str, ...]
    SOPClassUID: str
    SeriesNumber: int
    SeriesDescription: str
    Modality: str = "OT"


@dataclass(frozen=True)
class Evidence:
    """Where a study's strongest evidence lies, and the rule that made the study's score
    (:func:`scanwatch.study_score.study_result`'s ``strongest`` slice)."""

    rule: str  # the model's study rule by name: mean, max, top_3_mean, noisy_or
    SOPInstanceUID: str  # the strongest slice's instance
    frame: int | None  # its frame index (0-based) in a multi-frame instance, else None
    anomaly_score: float  # that slice's own, 1 - p(normal), uncalibrated

    def __post_init__(self) -> None:
        object.__setattr__(self, "anomaly_score", float(self.anomaly_score))
        if not 0.0 <= self.anomaly_score <= 1.0:
            raise ValueError(f"slice anomaly score {self.anomaly_score} is outside [0, 1]")


@dataclass(frozen=True, kw_only=True)
class ReceivedStudy:
    """A study as its chosen series' DICOM header describes it: what the Patient and the
    ImagingStudy are built from, before any model has scored it.

    Naive datetimes (DICOM dates and times have no zone unless TimezoneOffsetFromUTC is present)
    are read in ``timezone``. An empty ``PatientID`` (DICOM type 2) yields a Patient of this
    study alone, never one shared by every study without an id.
    """

    PatientID: str
    StudyInstanceUID: str
    series: ScoredSeries
    NumberOfStudyRelatedSeries: int
    NumberOfStudyRelatedInstances: int
    acquired: datetime | None = None
    started: datetime | None = None
    timezone: tzinfo = UTC
    IssuerOfPatientID: str | None = None
    PatientName: str | None = None
    PatientSex: str | None = None
    PatientBirthDate: date | None = None
    AccessionNumber: str | None = None
    StudyDescription: str | None = None


@dataclass(frozen=True, kw_only=True)
class ScoredStudy(ReceivedStudy):
    """Everything the FHIR resources of one (study, model version) are built from: the
    :class:`ReceivedStudy` and the model's answer.

    ``probabilities`` are study-level and in the order of ``class_names``, which must contain
    :data:`schemas.model_signature.NORMAL_CLASS`; ``issued`` must be timezone-aware.
    """

    model_name: str
    model_version: int
    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    threshold: float
    issued: datetime
    #: The Grad-CAM heatmap series, once stored; ``None`` while there is none (yet).
    heatmaps: HeatmapSeriesRef | None = None
    #: The strongest slice and the study rule; ``None`` for results made without them.
    evidence: Evidence | None = None

    def __post_init__(self) -> None:
        # Accept any sequence (lists, numpy arrays) but keep the frozen value hashable.
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "probabilities", tuple(float(p) for p in self.probabilities))
        if len(self.class_names) != len(self.probabilities):
            raise ValueError("class_names and probabilities differ in length")
        if NORMAL_CLASS not in self.class_names:
            raise ValueError(f"class_names {self.class_names} lack the {NORMAL_CLASS!r} class")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is outside [0, 1]")
        if self.model_version < 1:
            raise ValueError(f"model_version must be >= 1, not {self.model_version}")
        if self.issued.tzinfo is None:
            raise ValueError("issued must be timezone-aware")

    @property
    def anomaly_score(self) -> float:
        """1 − p(normal), clamped to [0, 1] against rounding."""
        p_normal = self.probabilities[self.class_names.index(NORMAL_CLASS)]
        return min(max(1.0 - p_normal, 0.0), 1.0)

    @property
    def predicted_class(self) -> str:
        """The class with the highest study-level probability."""
        best = max(range(len(self.probabilities)), key=self.probabilities.__getitem__)
        return self.class_names[best]

    @property
    def is_abnormal(self) -> bool:
        """Above the operating threshold. ``referenceRange.high`` is inclusive, so a score
        equal to the threshold is still normal."""
        return self.anomaly_score > self.threshold


# --- Builders --------------------------------------------------------------------------------


def resources_for(study: ScoredStudy) -> list[dict[str, Any]]:
    """The result and what it refers to, referenced ones first: Patient, Device, ImagingStudy,
    Observation."""
    return [patient(study), device(study), imaging_study(study), observation(study)]


def registered_resources_for(study: ReceivedStudy) -> list[dict[str, Any]]:
    """What a study received but not scored yet is known as: its Patient and its ImagingStudy
    with status ``registered`` (the scored one replaces it, same id)."""
    return [patient(study), imaging_study(study, REGISTERED_STATUS)]


def all_resources_for(study: ScoredStudy) -> list[dict[str, Any]]:
    """Everything the pipeline writes for a scored study: :func:`resources_for`, then the
    DiagnosticReport presenting the Observation and the Provenance of both."""
    return [*resources_for(study), diagnostic_report(study), provenance(study)]


def patient(study: ReceivedStudy) -> dict[str, Any]:
    """A minimal Patient from the DICOM patient module."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_logical_id(study)}
    if study.PatientID.strip():
        resource["identifier"] = [
            {
                "type": _concept(V2_0203_SYSTEM, MEDICAL_RECORD_TYPE, "Medical record number"),
                "system": patient_identifier_system(study.IssuerOfPatientID),
                "value": study.PatientID.strip(),
            }
        ]
    if study.PatientName and (name := human_name(study.PatientName)):
        resource["name"] = [name]
    if study.PatientSex:
        resource["gender"] = GENDER.get(study.PatientSex.strip().upper(), "unknown")
    if study.PatientBirthDate:
        resource["birthDate"] = study.PatientBirthDate.isoformat()
    return resource


def device(study: ScoredStudy) -> dict[str, Any]:
    """The Device that stands for the model version (name, version, classes, threshold)."""
    resource = {
        "resourceType": "Device",
        "id": ids.device_id(study.model_name, study.model_version),
        "identifier": [
            {"system": ids.DEVICE_ID_SYSTEM, "value": f"{study.model_name}|{study.model_version}"}
        ],
        "status": DEVICE_STATUS,
        "deviceName": [{"name": study.model_name, "type": "model-name"}],
        "modelNumber": study.model_name,
        "type": {
            "coding": [{"system": AI_DEVICE_TYPE_SYSTEM, "code": AI_DEVICE_TYPE}],
            "text": "AI software: MRI image classifier",
        },
        "version": [{"type": {"text": "model"}, "value": str(study.model_version)}],
        "property": [
            {
                "type": {"text": "operating-threshold"},
                "valueQuantity": [_quantity(study.threshold)],
            },
            {
                "type": {"text": "output-classes"},
                "valueCode": [
                    {"coding": [{"system": CLASS_SYSTEM, "code": name}], "text": name}
                    for name in study.class_names
                ],
            },
        ],
    }
    return resource


def imaging_study(study: ReceivedStudy, status: str = IMAGING_STUDY_STATUS) -> dict[str, Any]:
    """The ImagingStudy, listing the scored series (the one to be scored, while
    ``registered``)."""
    series = study.series
    modality = {"system": DCM_SYSTEM, "code": series.Modality}
    series_entry: dict[str, Any] = {
        "uid": series.SeriesInstanceUID,
        "modality": modality,
        "numberOfInstances": series.NumberOfSeriesRelatedInstances,
    }
    if series.SeriesNumber is not None:
        series_entry["number"] = series.SeriesNumber
    if series.SeriesDescription:
        series_entry["description"] = series.SeriesDescription
    series_entries = [series_entry]
    heatmaps = study.heatmaps if isinstance(study, ScoredStudy) else None
    if heatmaps is not None:
        series_entries.append(_heatmap_series(heatmaps))
    extra_instances = len(heatmaps.SOPInstanceUIDs) if heatmaps is not None else 0
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": ids.imaging_study_id(study.StudyInstanceUID),
        "identifier": [
            {"system": ids.DICOM_UID_SYSTEM, "value": f"urn:oid:{study.StudyInstanceUID}"}
        ],
        "status": status,
        "modality": [modality],
        "subject": {"reference": f"Patient/{patient_logical_id(study)}"},
        "numberOfSeries": study.NumberOfStudyRelatedSeries + (heatmaps is not None),
        "numberOfInstances": study.NumberOfStudyRelatedInstances + extra_instances,
        "series": series_entries,
    }
    if study.AccessionNumber:
        resource["identifier"].append(_accession(study.AccessionNumber))
    if study.started is not None:
        resource["started"] = _fhir_datetime(study.started, study.timezone)
    if study.StudyDescription:
        resource["description"] = study.StudyDescription
    return resource


def _heatmap_series(heatmaps: HeatmapSeriesRef) -> dict[str, Any]:
    """The ImagingStudy.series entry of the heatmap series, one instance per scored slice."""
    return {
        "uid": heatmaps.SeriesInstanceUID,
        "number": heatmaps.SeriesNumber,
        "modality": {"system": DCM_SYSTEM, "code": heatmaps.Modality},
        "description": heatmaps.SeriesDescription,
        "numberOfInstances": len(heatmaps.SOPInstanceUIDs),
        "instance": [
            {
                "uid": uid,
                "sopClass": {
                    "system": "urn:ietf:rfc:3986",
                    "code": f"urn:oid:{heatmaps.SOPClassUID}",
                },
                "number": number,
            }
            for number, uid in enumerate(heatmaps.SOPInstanceUIDs, start=1)
        ],
    }


def observation(study: ScoredStudy) -> dict[str, Any]:
    """The AI result: anomaly score, interpretation against the threshold, predicted class,
    one component per class probability and, when known, the study rule and the slice with the
    strongest evidence (its instance, frame number and own anomaly score)."""
    obs_id = ids.observation_id(study.StudyInstanceUID, study.model_name, study.model_version)
    imaging_ref = {"reference": f"ImagingStudy/{ids.imaging_study_id(study.StudyInstanceUID)}"}
    model_label = f"{study.model_name} v{study.model_version}"
    abnormal = study.is_abnormal
    predicted = study.predicted_class
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": obs_id,
        "meta": {"security": [_ai_asserted()]},
        "identifier": [{"system": ids.OBSERVATION_ID_SYSTEM, "value": obs_id}],
        "partOf": [imaging_ref],
        "status": OBSERVATION_STATUS,
        "category": [_concept(CATEGORY_SYSTEM, CATEGORY_IMAGING, "Imaging")],
        "code": {
            **_concept(CODE_SYSTEM, ANOMALY_SCORE_CODE, ANOMALY_SCORE_DISPLAY),
            "text": "AI anomaly score (MRI)",
        },
        "subject": {"reference": f"Patient/{patient_logical_id(study)}"},
        "issued": _fhir_datetime(study.issued, study.timezone),
        "valueQuantity": _quantity(study.anomaly_score),
        "interpretation": [
            {
                **_concept(
                    INTERPRETATION_SYSTEM,
                    ABNORMAL if abnormal else NORMAL,
                    "Abnormal" if abnormal else "Normal",
                ),
                "text": "Above model operating threshold"
                if abnormal
                else "At or below model operating threshold",
            }
        ],
        "note": [
            {
                "text": f"AI-generated by model {model_label}; not reviewed by a clinician. "
                "Not for standalone diagnosis."
            }
        ],
        "device": {
            "reference": f"Device/{ids.device_id(study.model_name, study.model_version)}",
            "display": model_label,
        },
        "referenceRange": [
            {
                "high": _quantity(study.threshold),
                "text": f"Model operating threshold {study.threshold:g}",
            }
        ],
        "derivedFrom": [imaging_ref],
        "component": [
            {
                "code": {
                    **_concept(DCM_SYSTEM, FINDING_CODE, "Finding"),
                    "text": "Predicted class",
                },
                "valueCodeableConcept": {**_concept(CLASS_SYSTEM, predicted), "text": predicted},
            },
            *(
                {
                    "code": _concept(
                        CODE_SYSTEM,
                        f"{PROBABILITY_CODE_PREFIX}{name}",
                        f"Model probability: {name}",
                    ),
                    "valueQuantity": _quantity(p),
                }
                for name, p in zip(study.class_names, study.probabilities, strict=True)
            ),
            *_evidence_components(study.evidence),
        ],
    }
    if study.AccessionNumber:
        resource["basedOn"] = [{"identifier": _accession(study.AccessionNumber)}]
    effective = study.acquired or study.started
    if effective is not None:
        resource["effectiveDateTime"] = _fhir_datetime(effective, study.timezone)
    return resource


def _evidence_components(evidence: Evidence | None) -> list[dict[str, Any]]:
    """The Observation's components of the study rule and the strongest slice."""
    if evidence is None:
        return []
    components: list[dict[str, Any]] = [
        {
            "code": _concept(CODE_SYSTEM, STUDY_RULE_CODE, STUDY_RULE_DISPLAY),
            "valueString": evidence.rule,
        },
        {
            "code": _concept(CODE_SYSTEM, STRONGEST_SLICE_CODE, STRONGEST_SLICE_DISPLAY),
            "valueString": evidence.SOPInstanceUID,
        },
    ]
    if evidence.frame is not None:
        components.append(
            {
                "code": _concept(
                    CODE_SYSTEM, STRONGEST_SLICE_FRAME_CODE, STRONGEST_SLICE_FRAME_DISPLAY
                ),
                "valueInteger": evidence.frame + 1,  # DICOM frame numbers start at 1
            }
        )
    components.append(
        {
            "code": _concept(
                CODE_SYSTEM, STRONGEST_SLICE_SCORE_CODE, STRONGEST_SLICE_SCORE_DISPLAY
            ),
            "valueQuantity": _quantity(evidence.anomaly_score),
        }
    )
    return components


def diagnostic_report(study: ScoredStudy) -> dict[str, Any]:
    """The report that presents the Observation to a clinician's worklist: preliminary, with a
    one-line conclusion that says it is AI output."""
    key = (study.StudyInstanceUID, study.model_name, study.model_version)
    imaging_id = ids.imaging_study_id(study.StudyInstanceUID)
    verdict = "above" if study.is_abnormal else "at or below"
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": ids.diagnostic_report_id(*key),
        "meta": {"security": [_ai_asserted()]},
        "identifier": [{"system": ids.REPORT_ID_SYSTEM, "value": ids.diagnostic_report_id(*key)}],
        "status": OBSERVATION_STATUS,
        "category": [_concept(V2_0074_SYSTEM, RADIOLOGY, "Radiology")],
        "code": {**_concept(CODE_SYSTEM, REPORT_CODE, REPORT_DISPLAY), "text": REPORT_DISPLAY},
        "subject": {"reference": f"Patient/{patient_logical_id(study)}"},
        "issued": _fhir_datetime(study.issued, study.timezone),
        "result": [{"reference": f"Observation/{ids.observation_id(*key)}"}],
        "imagingStudy": [{"reference": f"ImagingStudy/{imaging_id}"}],
        "conclusion": (
            f"AI anomaly score {study.anomaly_score:.2f}, {verdict} the operating threshold "
            f"{study.threshold:g}; most probable class: {study.predicted_class}. Generated by "
            f"model {study.model_name} v{study.model_version}; not reviewed by a clinician."
        ),
    }
    effective = study.acquired or study.started
    if effective is not None:
        resource["effectiveDateTime"] = _fhir_datetime(effective, study.timezone)
    return resource


def provenance(study: ScoredStudy) -> dict[str, Any]:
    """Who made the result from what: the model's Device assembled the Observation and its
    report from the ImagingStudy."""
    key = (study.StudyInstanceUID, study.model_name, study.model_version)
    device_id = ids.device_id(study.model_name, study.model_version)
    return {
        "resourceType": "Provenance",
        "id": ids.provenance_id(*key),
        "target": [
            {"reference": f"Observation/{ids.observation_id(*key)}"},
            {"reference": f"DiagnosticReport/{ids.diagnostic_report_id(*key)}"},
        ],
        "recorded": _fhir_datetime(study.issued, study.timezone),
        "activity": _concept(DATA_OPERATION_SYSTEM, "CREATE", "create"),
        "agent": [
            {
                "type": _concept(PARTICIPANT_TYPE_SYSTEM, "assembler", "Assembler"),
                "who": {
                    "reference": f"Device/{device_id}",
                    "display": f"{study.model_name} v{study.model_version}",
                },
            }
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "reference": f"ImagingStudy/{ids.imaging_study_id(study.StudyInstanceUID)}"
                },
            }
        ],
    }


# --- Helpers ---------------------------------------------------------------------------------


def _ai_asserted() -> dict[str, Any]:
    return {
        "system": SECURITY_SYSTEM,
        "code": AI_ASSERTED,
        "display": "Artificial Intelligence asserted",
    }


def patient_logical_id(study: ReceivedStudy) -> str:
    """The Patient id: from (IssuerOfPatientID, PatientID), or from the study when PatientID
    is empty (so unidentified patients are never merged into one)."""
    if study.PatientID.strip():
        return ids.patient_id(study.IssuerOfPatientID, study.PatientID.strip())
    return ids.patient_id(f"{PATIENT_ID_SYSTEM}:none", study.StudyInstanceUID)


def patient_identifier_system(issuer: str | None) -> str:
    """``Patient.identifier.system`` for an IssuerOfPatientID (or none)."""
    if issuer and issuer.strip():
        return f"{PATIENT_ID_SYSTEM}:{quote(issuer.strip(), safe='')}"
    return PATIENT_ID_SYSTEM


def human_name(person_name: str) -> dict[str, Any] | None:
    """A DICOM PN (``Family^Given^Middle^Prefix^Suffix``, alphabetic group) as a HumanName."""
    alphabetic = person_name.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    if given_names := [g for g in (given, middle) if g]:
        name["given"] = given_names
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    if name:
        name["text"] = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    return name or None


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _quantity(value: float) -> dict[str, Any]:
    return {"value": float(value), "unit": "probability", "system": UCUM_SYSTEM, "code": UCUM_UNITY}


def _accession(accession: str) -> dict[str, Any]:
    return {
        "type": _concept(V2_0203_SYSTEM, ACCESSION_TYPE),
        "system": ACCESSION_SYSTEM,
        "value": accession,
    }


def _fhir_datetime(value: datetime, tz: tzinfo) -> str:
    """FHIR dateTime/instant to the millisecond, in the R4B models' canonical form (``Z`` for
    UTC; six fraction digits when there is a fraction): a time needs a zone, so naive DICOM
    times get ``tz``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    text = value.replace(microsecond=value.microsecond // 1000 * 1000).isoformat()
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text
