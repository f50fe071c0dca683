"""A patient's records as the chatbot talks about them: results read from FHIR Observations and
DiagnosticReports, studies received but not scored yet (ImagingStudy ``registered``), which
study a patient points at, the trend, and the sentences that say it.

Pure functions, no I/O: the actions fetch the resources (:mod:`actions.fhir`) and pass them
here. Every sentence about a result says where it comes from (a preliminary AI result or one a
clinician reviewed) and when, never states a diagnosis, and says that the care team discusses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
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

    @property
    def reviewed(self) -> bool:
        return self.status in REVIEWED

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
    abnormal = any(
        _has_code(i, INTERPRETATION_SYSTEM, ABNORMAL) for i in observation.get("interpretation", [])
    )
    return Result(
        observation_id=str(observation.get("id")),
        study=study,
        effective=_instant(observation.get("effectiveDateTime")),
        issued=_instant(observation.get("issued")),
        status=str(observation.get("status", "preliminary")),
        score=float(value),
        threshold=float(high) if high is not None else None,
        abnormal=abnormal,
        model=str((observation.get("device") or {}).get("display", "the AI model")),
        probabilities=probabilities,
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


# --- Which study the patient means -------------------------------------------------------------

MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)


@dataclass(frozen=True)
class Pointer:
    """What the patient's message points at: a month, a relative reference, or nothing (the
    latest study, or the one the conversation is about)."""

    month: str | None = None
    ref: str | None = None  # latest, previous, first, today, yesterday

    @property
    def empty(self) -> bool:
        return self.month is None and self.ref is None


@dataclass(frozen=True)
class Choice:
    """The study chosen, or why none was (``missing`` says what the patient asked for)."""

    result: Result | None
    missing: str | None = None


def choose(
    results: Sequence[Result], pointer: Pointer, cursor: str | None, today: date, tz: tzinfo
) -> Choice:
    """The study ``pointer`` means among ``results`` (newest first). ``cursor`` is the study the
    conversation last talked about: "previous" is the one before it, and with no pointer the
    conversation stays on it."""
    if not results:
        return Choice(None, "any scan result")
    index = next((i for i, r in enumerate(results) if r.study == cursor), None)
    if pointer.month is not None:
        month = MONTHS.index(pointer.month) + 1 if pointer.month in MONTHS else None
        match = [r for r in results if r.when and r.when.astimezone(tz).month == month]
        return (
            Choice(match[0]) if match else Choice(None, f"a scan in {pointer.month.capitalize()}")
        )
    if pointer.ref == "latest":
        return Choice(results[0])
    if pointer.ref == "first":
        return Choice(results[-1])
    if pointer.ref == "previous":
        position = (index if index is not None else 0) + 1
        if position < len(results):
            return Choice(results[position])
        return Choice(None, "a scan before that one")
    if pointer.ref in ("today", "yesterday"):
        day = today if pointer.ref == "today" else date.fromordinal(today.toordinal() - 1)
        match = [r for r in results if r.when and r.when.astimezone(tz).date() == day]
        return Choice(match[0]) if match else Choice(None, f"a scan {pointer.ref}")
    return Choice(results[index if index is not None else 0])


# --- What the bot says -------------------------------------------------------------------------


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
        return f"A clinician has reviewed this result{signed}."
    return "This is a preliminary AI result: no clinician has reviewed it yet."


def describe(result: Result, tz: tzinfo, report: Report | None = None) -> str:
    """One study's result, with its source, its date and the care-team sentence."""
    return (
        f"Your scan of {day(result.when, tz)}: {score_words(result)}. "
        f"{status_words(result, tz, report)} {CARE_TEAM}"
    )


def describe_status(result: Result, tz: tzinfo, report: Report | None = None) -> str:
    if report is not None:
        return (
            f"The result of your scan of {day(result.when, tz)} has been reviewed by a clinician, "
            f"and their report is final. {CARE_TEAM}"
        )
    if result.reviewed:
        return (
            f"The result of your scan of {day(result.when, tz)} has been reviewed by a clinician. "
            f"{CARE_TEAM}"
        )
    return (
        f"The result of your scan of {day(result.when, tz)} is a preliminary AI result: a "
        "computer program has analysed the images, and no clinician has reviewed it yet. A "
        f"clinician reviews every result. {CARE_TEAM}"
    )


NOT_YET = (
    "I don't have a result yet for {what}. The computer analysis usually finishes within minutes "
    "after the scanner has sent the last images, and a clinician reviews it after that. Please "
    "check again a little later. If you are worried, you can ask your care team to call you back."
)


def describe_received(received: Received, tz: tzinfo, latest: Result | None) -> str:
    """A study that arrived and has no result yet, and the latest result there is."""
    earlier = (
        f" The latest result I have is of your scan of {day(latest.when, tz)}; ask me about it if "
        "you like."
        if latest is not None
        else ""
    )
    return (
        f"Your scan of {day(received.when, tz)} has reached us, and the computer analysis (AI) "
        "of its images is not finished yet. It usually takes a few minutes, and a clinician "
        f"reviews the result after that. Please check again a little later.{earlier} If you are "
        "worried, you can ask your care team to call you back."
    )


def trend(results: Sequence[Result]) -> str | None:
    """improving, stable or worse: the newest study's score against the one before it."""
    if len(results) < 2:
        return None
    change = results[0].score - results[1].score
    if abs(change) < STABLE_BAND:
        return "stable"
    return "improving" if change < 0 else "worse"


def describe_history(results: Sequence[Result], tz: tzinfo) -> str:
    """Every study with its date, score and source, oldest first, then the trend."""
    lines = [
        f"- {day(r.when, tz)}: score {r.score:.2f}, "
        f"{'flagged' if r.abnormal else 'not flagged'}, "
        f"{'reviewed by a clinician' if r.reviewed else 'preliminary AI result'}"
        for r in reversed(results)
    ]
    word = trend(results)
    if word is None:
        summary = "You have one scan so far, so there is no trend to show yet."
    else:
        latest, before = results[0], results[1]
        direction = {
            "stable": "about the same as",
            "improving": "lower than",
            "worse": "higher than",
        }[word]
        summary = (
            f"Compared with your scan of {day(before.when, tz)}, the AI score of your scan of "
            f"{day(latest.when, tz)} is {direction} before ({before.score:.2f} → "
            f"{latest.score:.2f}): {word}. A lower score means the images look more like a "
            "typical scan to the program."
        )
    count = f"You have {len(results)} scan result{'s' if len(results) != 1 else ''}:"
    return "\n".join([count, *lines, summary, CARE_TEAM])


def describe_score(result: Result | None, tz: tzinfo) -> str:
    """What the score, the threshold and the classes mean, with this patient's numbers."""
    threshold = f"{result.threshold:.2f}" if result and result.threshold is not None else None
    parts = [
        "The anomaly score is a number between 0 and 1 that a computer program (AI) works out "
        "from your MRI images. Near 0 means the images look like a typical scan to the program; "
        "near 1 means they look unusual.",
        (
            f"Scores above the threshold ({threshold}) are flagged, so that a specialist looks at "
            "those scans first."
            if threshold
            else "Scores above a threshold are flagged, so that a specialist looks at those scans "
            "first."
        ),
    ]
    if result and result.probabilities:
        named = [CLASS_WORDS.get(name, name) for name in result.probabilities]
        parts.append(
            "The program also gives a likelihood for each of the patterns it knows: "
            + "; ".join(named)
            + ". These are pattern matches, not a diagnosis."
        )
    if result:
        parts.append(
            f"The score of your scan of {day(result.when, tz)} is {result.score:.2f}. "
            + status_words(result, tz)
        )
    parts.append("Your care team will explain what the result means for you.")
    return " ".join(parts)


def describe_report(report: Report, result: Result | None, tz: tzinfo) -> str:
    by = f" by {report.author}" if report.author else ""
    when = day(report.issued, tz) if report.issued else "a date not recorded"
    about = f"your scan of {day(result.when, tz)}" if result else "your scan"
    return (
        f"The clinician's conclusion on {about} (signed{by} on {when}): "
        f"\u201c{report.conclusion}\u201d "
        "Your care team will discuss it with you and answer your questions."
    )


def medication_lines(requests: Iterable[dict[str, Any]]) -> list[str]:
    """One line per active MedicationRequest: the medicine and how to take it."""
    lines = []
    for request in requests:
        concept = request.get("medicationCodeableConcept") or {}
        name = concept.get("text") or next(
            (c.get("display") for c in concept.get("coding", []) if c.get("display")), None
        )
        if not name:
            continue
        dosage = "; ".join(d["text"] for d in request.get("dosageInstruction", []) if d.get("text"))
        lines.append(f"- {name}" + (f": {dosage}" if dosage else ""))
    return lines


def describe_appointment(appointment: dict[str, Any] | None, tz: tzinfo) -> str:
    if appointment is None:
        return (
            "I don't see a future appointment booked for you. Your care team can tell you when "
            "your next visit should be."
        )
    start = _instant(appointment.get("start"))
    when = (
        f"{day(start, tz)} at {start.astimezone(tz):%H:%M}" if start else "a date to be confirmed"
    )
    what = appointment.get("description") or next(
        (s.get("text") for s in appointment.get("serviceType", []) if s.get("text")), None
    )
    weekday = f"{start.astimezone(tz):%A} " if start else ""
    return f"Your next appointment is on {weekday}{when}" + (f": {what}." if what else ".")
