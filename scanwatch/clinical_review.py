"""A clinician's review of an AI result, as FHIR R4 resources: the signed Observation, the final
DiagnosticReport, the Provenance of the signature, the clinician's minimal Practitioner, and the
transaction Bundle that writes them together; plus the clinician's answer to a patient's
callback request. Built here once, so that the console, the FHIR API's checks and the tests
build them the same way.

Pure functions of resource dicts, standard library and :mod:`scanwatch.fhir_codes` /
:mod:`scanwatch.ids` only (like :mod:`scanwatch.care_plan`).

**Shape of a signed result** (issue 17, point 5):

- ``Observation.status`` becomes ``final`` when the clinician confirms the AI's class and
  ``amended`` when they correct it. The Finding component (DCM 121071) and ``interpretation``
  carry the clinician's class (``A`` unless the class is a normal one); ``performer`` is the
  Practitioner; ``issued`` is when it was signed.
- Which values are still the AI's is said on the current version, element by element, with the
  DS4P inline security label extension (:data:`INLINE_LABEL_URL`) coded ``AIAST`` (Artificial
  Intelligence asserted), the element-level form of the resource's ``meta.security`` label that
  HL7's AI Transparency IG uses: the anomaly score (``valueQuantity``), the model's threshold
  (``referenceRange``), each class probability component, and an added component
  :data:`AI_FINDING_CODE` holding the class the AI predicted. Everything not labelled is the
  clinician's. The resource keeps its ``meta.security`` AIAST: it still holds AI-asserted
  values. The AI's whole original version stays in the resource's history (``vread``).
- The DiagnosticReport of the result becomes ``final``: ``conclusion`` (the clinician's words,
  stored as given: text, never markup), ``conclusionCode`` (the class), ``resultsInterpreter``
  (the Practitioner); its AI label goes, since its content is now the clinician's.
- A Provenance records the signature: its targets are the exact versions written
  (``Observation/<id>/_history/<n>``), its entity the AI's version it revised, the Practitioner as
  ``verifier`` (confirmed) or ``author`` (corrected) with a ``Provenance.signature`` of that
  type. Its id comes from the versions it signs, so a retried transaction does not add one.

:func:`review_transaction` writes the Observation and the report with ``ifMatch`` on the
versions the clinician saw: a change in between fails the whole transaction (412) and nothing
is written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from scanwatch import ids
from scanwatch.fhir_codes import (
    ABNORMAL,
    ANOMALY_SCORE_CODE,
    CLASS_SYSTEM,
    CODE_SYSTEM,
    DCM_SYSTEM,
    FINDING_CODE,
    INTERPRETATION_SYSTEM,
    NORMAL,
    PROBABILITY_CODE_PREFIX,
    REPORT_CODE,
)

#: Observation/DiagnosticReport statuses of a result a clinician signed (the worker leaves
#: these alone; ``scanwatch.patient_records.REVIEWED`` reads them as reviewed).
SIGNED_STATUSES = ("final", "amended", "corrected")
CONFIRMED = "final"
CORRECTED = "amended"
#: Classes that mean "nothing found": a clinician's class among them reads as Normal.
NORMAL_CLASSES = ("normal", "notumor")
#: Longest conclusion accepted (characters).
MAX_CONCLUSION = 10_000

#: DS4P inline security label (an element-level ``meta.security``).
INLINE_LABEL_URL = (
    "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label"
)
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AI_ASSERTED = "AIAST"
#: Component code of the class the AI predicted, kept beside the clinician's Finding.
AI_FINDING_CODE = "ai-finding"
AI_FINDING_DISPLAY = "AI predicted class (before review)"
#: ``Practitioner.identifier.system`` of a staff account (the token's ``sub``).
STAFF_ID_SYSTEM = "urn:scanwatch:staff-account"

DATA_OPERATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
SIGNATURE_SYSTEM = "urn:iso-astm:E1762-95:2013"
#: ASTM E1762 signature types: the clinician verified the AI's content / authored a correction.
VERIFICATION_SIGNATURE = ("1.2.840.10065.1.12.1.5", "Verification Signature")
AUTHOR_SIGNATURE = ("1.2.840.10065.1.12.1.1", "Author's Signature")
#: CommunicationRequest statuses a clinician sets while working through callback requests.
CALLBACK_STATUSES = ("active", "completed", "on-hold", "revoked")


class ReviewError(ValueError):
    """A review that cannot be signed; ``field`` names the FHIR element at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Signer:
    """The clinician who signs: ``fhir_user`` is ``Practitioner/<id>`` (the token's
    ``fhirUser``), ``display`` the name shown to patients (optional)."""

    fhir_user: str
    display: str | None = None

    def __post_init__(self) -> None:
        kind, _, logical = self.fhir_user.partition("/")
        if kind != "Practitioner" or not logical:
            raise ReviewError("fhirUser", f"must be Practitioner/<id>, not {self.fhir_user!r}")

    @property
    def practitioner_id(self) -> str:
        return self.fhir_user.partition("/")[2]

    def reference(self) -> dict[str, str]:
        reference = {"reference": self.fhir_user}
        if self.display:
            reference["display"] = self.display
        return reference


# --- Reading an AI result --------------------------------------------------------------------


def _has_code(concept: dict[str, Any] | None, system: str, code: str) -> bool:
    return any(
        c.get("system") == system and c.get("code") == code
        for c in (concept or {}).get("coding", [])
    )


def is_ai_result(observation: dict[str, Any]) -> bool:
    """Whether ``observation`` is an anomaly-score result of scanwatch's model."""
    return _has_code(observation.get("code"), CODE_SYSTEM, ANOMALY_SCORE_CODE)


def model_classes(observation: dict[str, Any]) -> list[str]:
    """The classes the model scored (its probability components), in order."""
    classes = []
    for component in observation.get("component") or []:
        for coding in (component.get("code") or {}).get("coding", []):
            code = coding.get("code", "")
            if coding.get("system") == CODE_SYSTEM and code.startswith(PROBABILITY_CODE_PREFIX):
                classes.append(code[len(PROBABILITY_CODE_PREFIX) :])
    return classes


def _finding(observation: dict[str, Any], system: str, code: str) -> str | None:
    for component in observation.get("component") or []:
        if _has_code(component.get("code"), system, code):
            concept = component.get("valueCodeableConcept") or {}
            return next(
                (
                    c.get("code")
                    for c in concept.get("coding", [])
                    if c.get("system") == CLASS_SYSTEM
                ),
                None,
            )
    return None


def finding_class(observation: dict[str, Any]) -> str | None:
    """The class of the Finding component (the AI's, or the clinician's once signed)."""
    return _finding(observation, DCM_SYSTEM, FINDING_CODE)


def ai_class(observation: dict[str, Any]) -> str | None:
    """The class the AI predicted: the :data:`AI_FINDING_CODE` component of a signed result,
    else the Finding of the AI's own version."""
    return _finding(observation, CODE_SYSTEM, AI_FINDING_CODE) or finding_class(observation)


def version_of(resource: dict[str, Any]) -> int:
    """``meta.versionId`` as a number (ReviewError when absent: the API's read gives it)."""
    version = str((resource.get("meta") or {}).get("versionId", ""))
    if not version.isdigit():
        raise ReviewError(f"{resource.get('resourceType')}.meta.versionId", "is missing")
    return int(version)


# --- Checks (the console's form and the FHIR API share them) ----------------------------------


def check_conclusion(conclusion: str) -> str:
    """The conclusion as stored (surrounding blanks dropped); ReviewError when blank or too
    long. Markup in it is kept as text: escaping is the page's job."""
    text = conclusion.strip() if isinstance(conclusion, str) else ""
    if not text:
        raise ReviewError("DiagnosticReport.conclusion", "a signed report needs a conclusion")
    if len(text) > MAX_CONCLUSION:
        raise ReviewError("DiagnosticReport.conclusion", f"longer than {MAX_CONCLUSION} characters")
    return text


def check_class(observation: dict[str, Any], chosen: str) -> str:
    """``chosen`` if it is one of the model's classes for this result; ReviewError otherwise."""
    classes = model_classes(observation)
    if chosen not in classes:
        raise ReviewError(
            "Observation.component:finding",
            f"class {str(chosen)[:60]!r} is not one of the model's classes ({', '.join(classes)})",
        )
    return chosen


def check_signed(resource: dict[str, Any]) -> None:
    """ReviewError for a signed result the FHIR API must refuse: a signed report on an AI
    result without a conclusion, a signed AI result whose Finding is not one of the model's
    classes. Other systems' Observations and reports are not judged here."""
    status = resource.get("status")
    if status not in SIGNED_STATUSES:
        return
    kind = resource.get("resourceType")
    if kind == "DiagnosticReport" and _has_code(resource.get("code"), CODE_SYSTEM, REPORT_CODE):
        check_conclusion(resource.get("conclusion") or "")
    elif kind == "Observation" and is_ai_result(resource):
        chosen = finding_class(resource)
        if chosen is None:
            raise ReviewError("Observation.component:finding", "a signed result names its class")
        check_class(resource, chosen)


# --- Building the signed resources ------------------------------------------------------------


def _instant(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone")
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ai_label() -> list[dict[str, Any]]:
    return [
        {
            "url": INLINE_LABEL_URL,
            "valueCoding": {
                "system": SECURITY_SYSTEM,
                "code": AI_ASSERTED,
                "display": "Artificial Intelligence asserted",
            },
        }
    ]


def _labelled(element: dict[str, Any]) -> dict[str, Any]:
    """``element`` with the AIAST inline label (once)."""
    others = [e for e in element.get("extension") or [] if e.get("url") != INLINE_LABEL_URL]
    return {
        "extension": [*others, *_ai_label()],
        **{k: v for k, v in element.items() if k != "extension"},
    }


def _class_concept(name: str) -> dict[str, Any]:
    return {"coding": [{"system": CLASS_SYSTEM, "code": name}], "text": name}


def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    meta = {
        k: v
        for k, v in (resource.get("meta") or {}).items()
        if k not in ("versionId", "lastUpdated")
    }
    result = {k: v for k, v in resource.items() if k != "meta"}
    if meta:
        return (
            {k: result[k] for k in ("resourceType", "id") if k in result}
            | {"meta": meta}
            | {k: v for k, v in result.items() if k not in ("resourceType", "id")}
        )
    return result


def signed_observation(
    observation: dict[str, Any], chosen_class: str, signer: Signer, signed_at: datetime
) -> dict[str, Any]:
    """The signed version of an AI result (as read, with ``meta.versionId``): ``final`` when
    ``chosen_class`` is the AI's class, else ``amended``; see the module docstring."""
    if not is_ai_result(observation):
        raise ReviewError("Observation.code", "is not a scanwatch AI result")
    if observation.get("status") in SIGNED_STATUSES:
        raise ReviewError("Observation.status", f"is already {observation['status']}")
    check_class(observation, chosen_class)
    predicted = ai_class(observation)
    confirmed = chosen_class == predicted
    abnormal = chosen_class not in NORMAL_CLASSES
    model = (observation.get("device") or {}).get("display", "the AI model")
    when = _instant(signed_at)
    who = signer.display or signer.fhir_user
    resource = _without_server_meta(observation)
    resource["status"] = CONFIRMED if confirmed else CORRECTED
    resource["issued"] = when
    resource["performer"] = [signer.reference()]
    resource["valueQuantity"] = _labelled(resource["valueQuantity"])
    resource["referenceRange"] = [_labelled(r) for r in resource.get("referenceRange") or []]
    resource["interpretation"] = [
        {
            "coding": [
                {
                    "system": INTERPRETATION_SYSTEM,
                    "code": ABNORMAL if abnormal else NORMAL,
                    "display": "Abnormal" if abnormal else "Normal",
                }
            ],
            "text": f"Clinician's reading: {chosen_class}",
        }
    ]
    components = []
    for component in resource.get("component") or []:
        code = component.get("code")
        if _has_code(code, DCM_SYSTEM, FINDING_CODE) or _has_code(
            code, CODE_SYSTEM, AI_FINDING_CODE
        ):
            continue
        components.append(_labelled(component))  # a class probability: the AI's
    resource["component"] = [
        {
            "code": {
                "coding": [{"system": DCM_SYSTEM, "code": FINDING_CODE, "display": "Finding"}],
                "text": "Clinician's class",
            },
            "valueCodeableConcept": _class_concept(chosen_class),
        },
        _labelled(
            {
                "code": {
                    "coding": [
                        {
                            "system": CODE_SYSTEM,
                            "code": AI_FINDING_CODE,
                            "display": AI_FINDING_DISPLAY,
                        }
                    ],
                    "text": AI_FINDING_DISPLAY,
                },
                "valueCodeableConcept": _class_concept(predicted or "unknown"),
            }
        ),
        *components,
    ]
    verb = "confirmed" if confirmed else f"corrected (AI class: {predicted})"
    resource["note"] = [
        {
            "text": f"AI-generated by model {model}; reviewed and {verb} by {who} on {when}. "
            "Values labelled AIAST are the AI's."
        }
    ]
    return resource


def signed_report(
    report: dict[str, Any],
    observation: dict[str, Any],
    chosen_class: str,
    conclusion: str,
    signer: Signer,
    signed_at: datetime,
) -> dict[str, Any]:
    """The final version of the result's DiagnosticReport (as read): the clinician's
    ``conclusion`` and class, the Practitioner as ``resultsInterpreter``."""
    text = check_conclusion(conclusion)
    check_class(observation, chosen_class)
    resource = _without_server_meta(report)
    meta = resource.pop("meta", {})
    labels = [s for s in meta.get("security", []) if s.get("code") != AI_ASSERTED]
    meta = {k: v for k, v in meta.items() if k != "security"} | (
        {"security": labels} if labels else {}
    )
    head = {"resourceType": "DiagnosticReport", "id": resource["id"]}
    if meta:
        head["meta"] = meta
    resource = head | {k: v for k, v in resource.items() if k not in head}
    resource["status"] = CONFIRMED
    resource["issued"] = _instant(signed_at)
    resource["resultsInterpreter"] = [signer.reference()]
    resource["conclusion"] = text
    resource["conclusionCode"] = [_class_concept(chosen_class)]
    return resource


def practitioner(signer: Signer, account: str | None = None) -> dict[str, Any]:
    """The clinician's minimal Practitioner (created if absent): the id of ``fhirUser``, the
    staff ``account`` (the token's ``sub``) as identifier, the display name when known."""
    resource: dict[str, Any] = {"resourceType": "Practitioner", "id": signer.practitioner_id}
    if account:
        resource["identifier"] = [{"system": STAFF_ID_SYSTEM, "value": account}]
    resource["active"] = True
    if signer.display:
        resource["name"] = [{"text": signer.display}]
    return resource


def provenance_id(observation_id: str, signed_version: int) -> str:
    """The Provenance of one signature: one per signed version of a result."""
    return str(uuid.uuid5(ids.NAMESPACE, f"Provenance|review|{observation_id}|{signed_version}"))


def signature_provenance(
    observation: dict[str, Any],
    report: dict[str, Any],
    confirmed: bool,
    signer: Signer,
    signed_at: datetime,
) -> dict[str, Any]:
    """The Provenance of the signature: targets the versions the review writes (one after those
    read), revises the AI's version, the clinician as verifier or author, signed."""
    obs_id, obs_version = observation["id"], version_of(observation)
    report_version = version_of(report)
    signature_type, signature_display = VERIFICATION_SIGNATURE if confirmed else AUTHOR_SIGNATURE
    role = ("verifier", "Verifier") if confirmed else ("author", "Author")
    when = _instant(signed_at)
    return {
        "resourceType": "Provenance",
        "id": provenance_id(obs_id, obs_version + 1),
        "target": [
            {"reference": f"Observation/{obs_id}/_history/{obs_version + 1}"},
            {"reference": f"DiagnosticReport/{report['id']}/_history/{report_version + 1}"},
        ],
        "recorded": when,
        "activity": {
            "coding": [{"system": DATA_OPERATION_SYSTEM, "code": "UPDATE", "display": "revise"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {"system": PARTICIPANT_TYPE_SYSTEM, "code": role[0], "display": role[1]}
                    ]
                },
                "who": signer.reference(),
            }
        ],
        "entity": [
            {
                "role": "revision",
                "what": {"reference": f"Observation/{obs_id}/_history/{obs_version}"},
            }
        ],
        "signature": [
            {
                "type": [
                    {
                        "system": SIGNATURE_SYSTEM,
                        "code": signature_type,
                        "display": signature_display,
                    }
                ],
                "when": when,
                "who": signer.reference(),
            }
        ],
    }


def review_resources(
    observation: dict[str, Any],
    report: dict[str, Any],
    *,
    chosen_class: str,
    conclusion: str,
    signer: Signer,
    signed_at: datetime,
) -> list[dict[str, Any]]:
    """The signed Observation, the final DiagnosticReport and the Provenance of a review of
    ``observation`` and its ``report`` (both as read, with ``meta.versionId``). ReviewError
    names the field when the conclusion is blank or the class unknown."""
    check_conclusion(conclusion)
    check_class(observation, chosen_class)
    signed = signed_observation(observation, chosen_class, signer, signed_at)
    return [
        signed,
        signed_report(report, observation, chosen_class, conclusion, signer, signed_at),
        signature_provenance(observation, report, signed["status"] == CONFIRMED, signer, signed_at),
    ]


def transaction(
    entries: list[tuple[dict[str, Any], int | None]], base: str | None = None
) -> dict[str, Any]:
    """A transaction Bundle of ``PUT`` entries: (resource, the version it must replace or
    None). ``base`` (the FHIR base URL) gives each entry its ``fullUrl``, which must be
    absolute; without it entries have none (the server goes by ``request.url``)."""
    bundle_entries = []
    for resource, if_match in entries:
        request: dict[str, Any] = {
            "method": "PUT",
            "url": f"{resource['resourceType']}/{resource['id']}",
        }
        if if_match is not None:
            request["ifMatch"] = f'W/"{if_match}"'
        entry: dict[str, Any] = {}
        if base:
            entry["fullUrl"] = f"{base.rstrip('/')}/{request['url']}"
        bundle_entries.append(entry | {"resource": resource, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": bundle_entries}


def review_transaction(
    observation: dict[str, Any],
    report: dict[str, Any],
    *,
    chosen_class: str,
    conclusion: str,
    signer: Signer,
    signed_at: datetime,
    base: str | None = None,
) -> dict[str, Any]:
    """The transaction that signs a result: :func:`review_resources`, the Observation and the
    report each ``ifMatch`` the version read (412 for the whole Bundle when either changed)."""
    signed, final, provenance = review_resources(
        observation,
        report,
        chosen_class=chosen_class,
        conclusion=conclusion,
        signer=signer,
        signed_at=signed_at,
    )
    return transaction(
        [
            (signed, version_of(observation)),
            (final, version_of(report)),
            (provenance, None),
        ],
        base,
    )


# --- A patient's page -----------------------------------------------------------------------

#: The searches of one patient's timeline, by type: (type, sort). Each is the type's
#: ``patient`` search, which a clinician's ``user/*.read`` token may run for any patient.
TIMELINE = (
    ("ImagingStudy", "-_lastUpdated"),
    ("Observation", "-date"),
    ("DiagnosticReport", "-date"),
    ("MedicationRequest", "-date"),
    ("Appointment", "date"),
    ("CommunicationRequest", "-date"),
)


def timeline_queries(patient_id: str, count: int = 50) -> list[tuple[str, str]]:
    """(type, query string) of every search a clinician's patient page makes: the patient's
    studies, AI results and signed reports, prescriptions, appointments and callback
    requests, newest first (appointments soonest first)."""
    return [
        (resource_type, f"patient={patient_id}&_sort={sort}&_count={count}")
        for resource_type, sort in TIMELINE
    ]


# --- Callback requests ------------------------------------------------------------------------


def answer_callback(
    request: dict[str, Any],
    *,
    status: str,
    note: str,
    signer: Signer,
    answered_at: datetime,
) -> dict[str, Any]:
    """A patient's callback request (as read) after a clinician worked on it: ``status``
    (``completed`` once called back, ``active`` to keep it open), the clinician as ``sender``,
    and their ``note`` added (earlier notes kept)."""
    if status not in CALLBACK_STATUSES:
        raise ReviewError(
            "CommunicationRequest.status", f"must be one of {', '.join(CALLBACK_STATUSES)}"
        )
    text = note.strip() if isinstance(note, str) else ""
    if not text:
        raise ReviewError("CommunicationRequest.note", "say what was done")
    resource = _without_server_meta(request)
    resource["status"] = status
    resource["sender"] = signer.reference()
    resource["note"] = [
        *(resource.get("note") or []),
        {"authorReference": signer.reference(), "time": _instant(answered_at), "text": text},
    ]
    return resource
