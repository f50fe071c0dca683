"""A patient's records as the chatbot talks about them: results read from FHIR Observations and
DiagnosticReports, studies received but not scored yet (ImagingStudy ``registered``), which
study a patient points at, the trend, and the sentences that say it.

Pure functions, no I/O: the actions fetch the resources (:mod:`actions.fhir`) and pass them
here. Reading results, and the words for one, come from :mod:`scanwatch.patient_records`,
which the portal shares. Every sentence about a result says where it comes from (a preliminary
AI result or one a clinician reviewed) and when, never states a diagnosis, and says that the
care team discusses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, tzinfo
from typing import Any

# What a result is and the words every patient-facing surface says about it are shared with
# the patient portal (standard library only, so this virtualenv imports it).
from scanwatch.patient_records import (
    CARE_TEAM,
    CLASS_WORDS,
    STABLE_BAND,
    Received,
    Report,
    Result,
    _instant,
    day,
    final_reports,
    received_studies,
    results_by_study,
    score_words,
    status_words,
)

#: What the actions use from the shared module through this one.
__all__ = [
    "Received",
    "Report",
    "Result",
    "day",
    "final_reports",
    "received_studies",
    "results_by_study",
    "status_words",
]


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
