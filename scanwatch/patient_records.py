"""A patient's AI results in plain words: the Observations, DiagnosticReports and ImagingStudies
of one patient read as results (one per study), signed reports and studies still being
analysed, and the sentences every patient-facing surface says about them.

Written once for the chatbot's actions and the patient portal: every sentence about a result
says where it comes from (a preliminary AI result or one a clinician reviewed) and when, never
states a diagnosis, and says that the care team discusses it. Pure functions on resource
dicts, standard library and :mod:`scanwatch.fhir_codes` only: the chatbot's actions
(``chatbot/actions/records.py``, in their own virtualenv) import it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from scanwatch.fhir_codes import (
    ABNORMAL,
    ANOMALY_SCORE_CODE,
    CODE_SYSTEM,
    DCM_SYSTEM,
    FINDING_CODE,
    INTERPRETATION_SYSTEM,
    PROBABILITY_CODE_PREFIX,
)

#: Observation/DiagnosticReport statuses that mean a clinician has reviewed the result.
REVIEWED = ("final", "amended", "corrected")
#: A change of the anomaly score smaller than this between two studies reads as "stable".
STABLE_BAND = 0.05
#: Said after every answer about a result.
CARE_TEAM = "It is not a diagnosis: your care team will discuss the result with you."

#: What each class a model predicts means, for a lay reader. A class missing here is named as is.
CLASS_WORDS = {
    "normal": "no sign of a finding",
    "notumor": "no sign of a tumour",
    "mass": "a pattern the program associates with a mass (a growth)",
    "bleed": "a pattern the program associates with bleeding in the brain",
    "infarct": "a pattern the program associates with an area that lost its blood supply",
    "glioma": (
        "a pattern the program associates with a glioma (a growth of the brain's support cells)"
    ),
    "meningioma": (
        "a pattern the program associates with a meningioma (a growth of the brain's coverings)"
    ),
    "pituitary": "a pattern the program associates with a growth of the pituitary gland",
}


@dataclass(frozen=True)
class Result:
    """One study's AI result (the Observation of its newest model version, or of the version a
    clinician reviewed)."""

    observation_id: str
    study: str  # the ImagingStudy reference, "ImagingStudy/<id>"
    effective: datetime | None
    issued: datetime | None
    status: str
    score: float
    threshold: float | None
    abnormal: bool
    model: str
    probabilities: dict[str, float] = field(default_factory=dict)
    #: The class of the Finding component: the AI's, or the clinician's once signed.
    finding: str | None = None

    @property
    def reviewed(self) -> bool:
        return self.status in REVIEWED

    @property
    def corrected(self) -> bool:
        """Whether the clinician who signed it changed the AI's reading (``amended``)."""
        return self.status in ("amended", "corrected")

    @property
    def when(self) -> datetime | None:
        return self.effective or self.issued


@dataclass(frozen=True)
class Report:
    """A clinician's signed report on one study (a final DiagnosticReport)."""

    study: str
    status: str
    conclusion: str
    issued: datetime | None
    author: str | None


@dataclass(frozen=True)
class Received:
    """A study that has reached the hospital's system and has no result yet."""

    study: str  # "ImagingStudy/<id>"
    when: datetime | None  # when it was acquired (DICOM), else when it arrived


def _instant(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _has_code(concept: dict[str, Any] | None, system: str, code: str) -> bool:
    return any(
        c.get("system") == system and c.get("code") == code
        for c in (concept or {}).get("coding", [])
    )


def _study_of(resource: dict[str, Any], *fields: str) -> str | None:
    for name in fields:
        for ref in resource.get(name) or []:
            reference = ref.get("reference", "")
            if reference.startswith("ImagingStudy/"):
                return str(reference)
    return None


def parse_result(observation: dict[str, Any]) -> Result | None:
    """The :class:`Result` of an anomaly-score Observation; None for any other Observation."""
    if not _has_code(observation.get("code"), CODE_SYSTEM, ANOMALY_SCORE_CODE):
        return None
    value = (observation.get("valueQuantity") or {}).get("value")
    study = _study_of(observation, "partOf", "derivedFrom")
    if value is None or study is None:
        return None
    high = next(
        (r["high"]["value"] for r in observation.get("referenceRange", []) if "high" in r), None
    )
    probabilities = {}
    for component in observation.get("component", []):
        for coding in (component.get("code") or {}).get("coding", []):
            code = coding.get("code", "")
            if coding.get("system") == CODE_SYSTEM and code.startswith(PROBABILITY_CODE_PREFIX):
                probabilities[code[len(PROBABILITY_CODE_PREFIX) :]] = float(
                    component["valueQuantity"]["value"]
                )
    status = str(observation.get("status", "preliminary"))
    if status in REVIEWED and high is not None:
        # Once signed, the interpretation is the clinician's; "flagged" stays what the AI did
        # (the worker's rule: above the threshold, which is inclusive).
        abnormal = float(value) > float(high)
    else:
        abnormal = any(
            _has_code(i, INTERPRETATION_SYSTEM, ABNORMAL)
            for i in observation.get("interpretation", [])
        )
    return Result(
        observation_id=str(observation.get("id")),
        study=study,
        effective=_instant(observation.get("effectiveDateTime")),
        issued=_instant(observation.get("issued")),
        status=status,
        score=float(value),
        threshold=float(high) if high is not None else None,
        abnormal=abnormal,
        model=str((observation.get("device") or {}).get("display", "the AI model")),
        probabilities=probabilities,
        finding=predicted_class(observation),
    )


def predicted_class(observation: dict[str, Any]) -> str | None:
    """The class the Finding component names (a clinician's correction, once amended)."""
    for component in observation.get("component", []):
        if _has_code(component.get("code"), DCM_SYSTEM, FINDING_CODE):
            concept = component.get("valueCodeableConcept") or {}
            return concept.get("text") or next(
                (c.get("code") for c in concept.get("coding", [])), None
            )
    return None


def results_by_study(observations: Iterable[dict[str, Any]]) -> list[Result]:
    """One result per study, newest study first. Of a study's results, one a clinician
    reviewed wins over a preliminary one; then the newest issued."""
    best: dict[str, Result] = {}
    for observation in observations:
        result = parse_result(observation)
        if result is None:
            continue
        current = best.get(result.study)
        if current is None or _rank(result) > _rank(current):
            best[result.study] = result
    return sorted(best.values(), key=lambda r: _epoch(r.when), reverse=True)


def _epoch(moment: datetime | None) -> float:
    return moment.timestamp() if moment else 0.0


def _rank(result: Result) -> tuple[bool, float]:
    return (result.reviewed, _epoch(result.issued))


def received_studies(imaging_studies: Iterable[dict[str, Any]]) -> list[Received]:
    """The studies still ``registered`` (received, not scored), newest first."""
    found = [
        Received(
            f"ImagingStudy/{study.get('id')}",
            _instant(study.get("started"))
            or _instant((study.get("meta") or {}).get("lastUpdated")),
        )
        for study in imaging_studies
        if study.get("status") == "registered"
    ]
    return sorted(found, key=lambda r: _epoch(r.when), reverse=True)


def final_reports(reports: Iterable[dict[str, Any]]) -> dict[str, Report]:
    """The signed (final, amended, corrected) DiagnosticReports by study; newest wins."""
    found: dict[str, Report] = {}
    for resource in reports:
        study = _study_of(resource, "imagingStudy")
        conclusion = resource.get("conclusion")
        if study is None or resource.get("status") not in REVIEWED or not conclusion:
            continue
        author = next(
            (p.get("display") for p in resource.get("resultsInterpreter", []) if p.get("display")),
            None,
        )
        report = Report(
            study, resource["status"], conclusion, _instant(resource.get("issued")), author
        )
        if study not in found or _epoch(report.issued) > _epoch(found[study].issued):
            found[study] = report
    return found


# --- What is said ---------------------------------------------------------------------------


def day(moment: datetime | None, tz: tzinfo) -> str:
    """A date for lay readers: "14 March 2026"."""
    if moment is None:
        return "an unknown date"
    local = moment.astimezone(tz)
    return f"{local.day} {local:%B %Y}"


def score_words(result: Result) -> str:
    threshold = f"{result.threshold:.2f}" if result.threshold is not None else "the threshold"
    if result.abnormal:
        return (
            f"the computer analysis (AI) flagged it for a closer look by a specialist "
            f"(score {result.score:.2f}; scores above {threshold} are flagged)"
        )
    return (
        f"the computer analysis (AI) did not flag anything unusual "
        f"(score {result.score:.2f}; scores above {threshold} are flagged)"
    )


def status_words(result: Result, tz: tzinfo, report: Report | None = None) -> str:
    if result.reviewed or report is not None:
        signed = f" on {day(report.issued, tz)}" if report and report.issued else ""
        if result.corrected:
            return (
                f"A clinician has reviewed this result{signed} and corrected the computer's "
                "reading."
            )
        if result.reviewed:
            return (
                f"A clinician has reviewed this result{signed} and confirmed the computer's "
                "reading."
            )
        return f"A clinician has reviewed this result{signed}."
    return "This is a preliminary AI result: no clinician has reviewed it yet."
