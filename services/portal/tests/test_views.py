"""What the pages say, from FHIR resources as the worker writes them (``devtools.chatbot_records``):
plain words, the source of each result, dates for lay readers, escaping."""

from __future__ import annotations

from datetime import UTC
from zoneinfo import ZoneInfo

from fastapi.templating import Jinja2Templates
from starlette.requests import Request

from devtools import chatbot_records
from services.portal import views
from services.portal.app import HERE

ALICE = chatbot_records.patient_id(chatbot_records.ALICE)


def alice(resource_type: str) -> list[dict]:
    resources = chatbot_records.records()[chatbot_records.ALICE]
    return [r for r in resources if r["resourceType"] == resource_type]


def page() -> views.ResultsPage:
    return views.results_page(
        alice("Observation"), alice("ImagingStudy"), alice("DiagnosticReport"), UTC
    )


def test_results_newest_first_in_plain_words() -> None:
    rows = page().rows
    assert [r.date for r in rows] == ["20 May 2025", "11 March 2025", "14 January 2025"]
    may, march, january = rows
    assert may.study == "MRI brain"
    assert may.status == views.PRELIMINARY_LABEL and not may.reviewed
    assert not may.flagged and "did not flag anything unusual" in may.words
    assert "no clinician has reviewed it yet" in may.status_sentence
    assert march.status == views.REVIEWED_LABEL and march.reviewed
    assert march.conclusion == chatbot_records.CONCLUSION
    assert march.concluded_by == "Dr. Rivera, radiologist" and march.concluded_on == "12 March 2025"
    assert january.flagged and january.words.startswith("The computer analysis (AI) flagged it")
    assert january.conclusion is None


def test_the_chart_runs_oldest_first_with_a_summary() -> None:
    data = page()
    assert [r.date for r in data.chart_rows] == ["14 January 2025", "11 March 2025", "20 May 2025"]
    assert data.chart_summary == (
        "Anomaly score of 3 scans, 14 January 2025 to 20 May 2025; threshold 0.50; 2 flagged. "
        "The table below gives every value."
    )


def test_a_study_received_but_not_scored_is_being_analysed() -> None:
    registered = {
        "resourceType": "ImagingStudy",
        "id": "new-study",
        "status": "registered",
        "started": "2025-07-01T09:30:00+00:00",
        "subject": {"reference": f"Patient/{ALICE}"},
    }
    data = views.results_page(
        alice("Observation"), [*alice("ImagingStudy"), registered], alice("DiagnosticReport"), UTC
    )
    assert data.received == [
        views.ReceivedRow("MRI scan", "1 July 2025", "2025-07-01T09:30:00+00:00")
    ]
    assert data.received[0].status == "Received, being analysed"
    assert len(data.rows) == 3


def test_one_result_in_detail() -> None:
    observation = alice("Observation")[-1]  # May: mass most likely
    detail = views.result_detail(observation, alice("ImagingStudy"), alice("DiagnosticReport"), UTC)
    assert detail is not None
    assert (detail.model_name, detail.model_version) == ("brain-mri-anomaly", "1")
    assert [p.name for p in detail.probabilities] == ["normal", "mass", "bleed", "infarct"]
    assert detail.probabilities[0].percent == "71%"
    assert detail.probabilities[0].words == "No sign of a finding"
    assert detail.predicted == "No sign of a finding"
    assert sum(p.value for p in detail.probabilities) > 0.99
    assert "not a diagnosis" in detail.care_team
    not_a_result = {"resourceType": "Observation", "id": "x", "code": {"text": "blood pressure"}}
    assert views.result_detail(not_a_result, [], [], UTC) is None


def test_dates_in_the_hospitals_time_zone() -> None:
    late = {
        "resourceType": "Appointment",
        "start": "2031-01-15T23:30:00Z",
        "description": "Follow-up",
        "participant": [{"actor": {"reference": f"Patient/{ALICE}"}}],
    }
    assert views.visit(late, UTC).when == "Wednesday 15 January 2031 at 23:30"
    assert views.visit(late, ZoneInfo("Europe/Paris")).when == "Thursday 16 January 2031 at 00:30"
    assert views.visit(None, UTC) is None


def test_only_active_medicines() -> None:
    found = views.medications(alice("MedicationRequest"), UTC)
    assert [m.name for m in found] == ["Levetiracetam 500 mg oral tablet"]
    assert found[0].dosage == "one tablet twice a day" and found[0].prescribed == "12 March 2025"


def test_strings_from_fhir_are_escaped() -> None:
    """A conclusion or a study description with markup is shown as text, never as HTML."""
    nasty = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    studies = [s | {"description": nasty} for s in alice("ImagingStudy")]
    reports = [
        r | {"conclusion": nasty} if r.get("status") == "final" else r
        for r in alice("DiagnosticReport")
    ]
    data = views.results_page(alice("Observation"), studies, reports, UTC)
    templates = Jinja2Templates(directory=HERE / "templates")
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    html = templates.get_template("_results.html").render(
        request=Request(scope), results=data, csrf="", signed_in=True
    )
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
