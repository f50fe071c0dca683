"""What the pages show, built from the patient's FHIR resources: pure functions, no I/O, so
that every sentence a patient reads is tested without a server.

The wording follows :mod:`scanwatch.patient_records` (shared with the chatbot): a result says
whether it is a preliminary AI result or one a clinician reviewed, and when; no sentence states
a diagnosis; the care team discusses the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from scanwatch.patient_records import (
    CARE_TEAM,
    CLASS_WORDS,
    Received,
    Report,
    Result,
    day,
    final_reports,
    parse_result,
    predicted_class,
    received_studies,
    results_by_study,
    score_words,
    status_words,
)

#: What a study is called when its ImagingStudy has no description.
DEFAULT_STUDY = "MRI scan"
PRELIMINARY_LABEL = "Preliminary AI result"
REVIEWED_LABEL = "Reviewed by a clinician"
RECEIVED_LABEL = "Received, being analysed"

#: What the numbers mean, on the detail page (lay words).
SCORE_MEANING = (
    "The anomaly score is a number between 0 and 1 that a computer program (AI) works out from "
    "the MRI images. Near 0 means the images look like a typical scan to the program; near 1 "
    "means they look unusual."
)
THRESHOLD_MEANING = (
    "Scores above the threshold are flagged, so that a specialist looks at those scans first. "
    "A flag is not a diagnosis, and a score below it does not rule anything out."
)
PROBABILITY_MEANING = (
    "The program also gives a likelihood for each pattern it knows. The likelihoods add up to "
    "100%. They are pattern matches, not a diagnosis."
)


@dataclass(frozen=True)
class ResultRow:
    """One study's result as the list, the chart and the detail page show it."""

    observation_id: str
    study: str  # what the study is called ("MRI brain")
    date: str  # "14 March 2026"
    when_iso: str  # for <time datetime> and the chart's x axis
    score: float
    threshold: float | None
    flagged: bool
    words: str  # the result in plain words
    reviewed: bool
    status: str  # PRELIMINARY_LABEL or REVIEWED_LABEL
    status_sentence: str
    conclusion: str | None = None  # the clinician's, once the report is final
    concluded_by: str | None = None
    concluded_on: str | None = None

    @property
    def score_text(self) -> str:
        return f"{self.score:.2f}"

    @property
    def threshold_text(self) -> str:
        return f"{self.threshold:.2f}" if self.threshold is not None else "not recorded"


@dataclass(frozen=True)
class ReceivedRow:
    """A study received and not scored yet."""

    study: str
    date: str
    when_iso: str
    status: str = RECEIVED_LABEL


@dataclass(frozen=True)
class Probability:
    name: str  # the class name the model uses
    words: str  # what it means
    percent: str  # "72%"
    value: float


@dataclass(frozen=True)
class ResultDetail:
    row: ResultRow
    model_name: str
    model_version: str
    predicted: str | None
    probabilities: list[Probability] = field(default_factory=list)
    care_team: str = CARE_TEAM


@dataclass(frozen=True)
class ResultsPage:
    rows: list[ResultRow]
    received: list[ReceivedRow]
    since: str | None  # the newest lastUpdated seen: where the event stream starts

    @property
    def chart_rows(self) -> list[ResultRow]:
        """The results oldest first (the chart's and its table's order)."""
        return list(reversed(self.rows))

    @property
    def chart_summary(self) -> str:
        rows = self.chart_rows
        if not rows:
            return "No results to chart yet."
        flagged = sum(r.flagged for r in rows)
        threshold = next((r.threshold_text for r in rows if r.threshold is not None), None)
        span = rows[0].date if len(rows) == 1 else f"{rows[0].date} to {rows[-1].date}"
        return (
            f"Anomaly score of {len(rows)} scan{'s' if len(rows) != 1 else ''}, {span}"
            + (f"; threshold {threshold}" if threshold else "")
            + f"; {flagged} flagged. The table below gives every value."
        )


@dataclass(frozen=True)
class Medication:
    name: str
    dosage: str | None
    prescribed: str | None


@dataclass(frozen=True)
class Visit:
    when: str  # "Wednesday 16 December 2026 at 10:00"
    when_iso: str
    what: str | None
    with_whom: str | None


def _instant(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment else ""


def study_names(imaging_studies: list[dict[str, Any]]) -> dict[str, str]:
    """What each study is called, by ``ImagingStudy/<id>``."""
    names = {}
    for study in imaging_studies:
        description = study.get("description")
        names[f"ImagingStudy/{study.get('id')}"] = (
            description if isinstance(description, str) and description else DEFAULT_STUDY
        )
    return names


def result_row(
    result: Result, tz: tzinfo, names: dict[str, str], report: Report | None = None
) -> ResultRow:
    reviewed = result.reviewed or report is not None
    words = score_words(result)
    return ResultRow(
        observation_id=result.observation_id,
        study=names.get(result.study, DEFAULT_STUDY),
        date=day(result.when, tz),
        when_iso=_iso(result.when),
        score=result.score,
        threshold=result.threshold,
        flagged=result.abnormal,
        words=words[0].upper() + words[1:] + ".",
        reviewed=reviewed,
        status=REVIEWED_LABEL if reviewed else PRELIMINARY_LABEL,
        status_sentence=status_words(result, tz, report),
        conclusion=report.conclusion if report else None,
        concluded_by=report.author if report else None,
        concluded_on=day(report.issued, tz) if report and report.issued else None,
    )


def results_page(
    observations: list[dict[str, Any]],
    imaging_studies: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    tz: tzinfo,
    since: str | None = None,
) -> ResultsPage:
    """The results list (newest first), the studies still being analysed, the chart's data."""
    names = study_names(imaging_studies)
    signed = final_reports(reports)
    results = results_by_study(observations)
    scored = {r.study for r in results}
    rows = [result_row(r, tz, names, signed.get(r.study)) for r in results]
    waiting: list[Received] = [
        r for r in received_studies(imaging_studies) if r.study not in scored
    ]
    received = [
        ReceivedRow(names.get(r.study, DEFAULT_STUDY), day(r.when, tz), _iso(r.when))
        for r in waiting
    ]
    return ResultsPage(rows, received, since)


def _sentence(words: str) -> str:
    """``words`` starting with a capital, as a table cell or a value stands alone."""
    return words[:1].upper() + words[1:]


def _model(observation: dict[str, Any]) -> tuple[str, str]:
    """(model name, version) from ``device.display`` ("brain-mri-anomaly v1")."""
    display = str((observation.get("device") or {}).get("display") or "")
    name, sep, version = display.rpartition(" v")
    if sep and version.isdigit():
        return name, version
    return display or "not recorded", "not recorded"


def result_detail(
    observation: dict[str, Any],
    imaging_studies: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    tz: tzinfo,
) -> ResultDetail | None:
    """One result in detail; None when the Observation is not an AI result."""
    result = parse_result(observation)
    if result is None:
        return None
    report = final_reports(reports).get(result.study)
    row = result_row(result, tz, study_names(imaging_studies), report)
    name, version = _model(observation)
    probabilities = sorted(
        (
            Probability(
                name=label,
                words=_sentence(CLASS_WORDS.get(label, label)),
                percent=f"{value * 100:.0f}%",
                value=value,
            )
            for label, value in result.probabilities.items()
        ),
        key=lambda p: p.value,
        reverse=True,
    )
    predicted = predicted_class(observation)
    return ResultDetail(
        row=row,
        model_name=name,
        model_version=version,
        predicted=_sentence(CLASS_WORDS.get(predicted, predicted)) if predicted else None,
        probabilities=probabilities,
    )


def medications(requests: list[dict[str, Any]], tz: tzinfo) -> list[Medication]:
    """The active prescriptions: medicine, how to take it, when it was prescribed."""
    found = []
    for request in requests:
        if request.get("status", "active") != "active":
            continue
        concept = request.get("medicationCodeableConcept") or {}
        name = concept.get("text") or next(
            (c.get("display") for c in concept.get("coding", []) if c.get("display")), None
        )
        if not name:
            continue
        dosage = "; ".join(d["text"] for d in request.get("dosageInstruction", []) if d.get("text"))
        authored = _instant(request.get("authoredOn"))
        found.append(Medication(str(name), dosage or None, day(authored, tz) if authored else None))
    return found


def visit(appointment: dict[str, Any] | None, tz: tzinfo) -> Visit | None:
    """The next appointment, in lay words."""
    if appointment is None:
        return None
    start = _instant(appointment.get("start"))
    if start is None:
        when = "date to be confirmed"
    else:
        local = start.astimezone(tz)
        when = f"{local:%A} {day(start, tz)} at {local:%H:%M}"
    what = appointment.get("description") or next(
        (s.get("text") for s in appointment.get("serviceType", []) if s.get("text")), None
    )
    others = [
        str((p.get("actor") or {}).get("display"))
        for p in appointment.get("participant", [])
        if (p.get("actor") or {}).get("display")
        and not str((p.get("actor") or {}).get("reference", "")).startswith("Patient/")
    ]
    return Visit(when, _iso(start), what, ", ".join(others) or None)
