"""After a clinician signs a result (``scanwatch.clinical_review``, as the console and the FHIR
API write it), the chatbot says it is reviewed, that the clinician corrected the computer's
reading, and quotes the clinician's conclusion as they wrote it (markup is text here; a page
escapes it). Bob's one study is signed in the fake FHIR API's records."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from actions import actions
from actions.settings import Settings

from scanwatch import clinical_review
from tests.fake_fhir import RECORDS, FakeFhir, serve
from tests.test_actions import BOB, TOKENS, run

CONCLUSION = "<b>No mass</b>: a normal variant. <script>alert(1)</script>"
SIGNER = clinical_review.Signer("Practitioner/staff-ada", "Dr Ada Lovelace")


def _as_read(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "meta": {**resource.get("meta", {}), "versionId": "1"}}


def signed_records() -> dict[str, list[dict[str, Any]]]:
    records = copy.deepcopy(RECORDS)
    bob = records[BOB]
    observation = next(r for r in bob if r["resourceType"] == "Observation")
    report = next(r for r in bob if r["resourceType"] == "DiagnosticReport")
    assert clinical_review.finding_class(observation) == "mass"
    signed, final, _provenance = clinical_review.review_resources(
        _as_read(observation),
        _as_read(report),
        chosen_class="normal",
        conclusion=CONCLUSION,
        signer=SIGNER,
        signed_at=datetime(2025, 6, 5, 9, 0, tzinfo=UTC),
    )
    records[BOB] = [signed if r is observation else final if r is report else r for r in bob]
    return records


@pytest.fixture
def fhir(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFhir]:
    with serve(FakeFhir(dict(TOKENS), records=signed_records())) as fake:
        monkeypatch.setattr(actions, "SETTINGS", Settings(fhir_base_url=fake.base_url))
        yield fake


def test_the_latest_result_is_reviewed_and_corrected(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionLatestResult(), "what did my scan show?", token="bob-token")
    assert "A clinician has reviewed this result on 5 June 2025" in text
    assert "corrected the computer's reading" in text
    assert "preliminary" not in text
    # "Flagged" is still what the AI did (score above the threshold), not the correction.
    assert "flagged it for a closer look" in text


def test_the_report_quotes_the_clinicians_conclusion(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionReportSummary(), "what does the report say?", token="bob-token")
    assert CONCLUSION in text  # as written: the chat panel escapes it
    assert "signed by Dr Ada Lovelace on 5 June 2025" in text
    status, _, _ = run(actions.ActionResultStatus(), "was it reviewed?", token="bob-token")
    assert "reviewed by a clinician" in status and "their report is final" in status
