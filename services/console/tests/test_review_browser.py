"""A clinician's review and patient pages in a real browser (Chromium via Playwright) against
the real authorization server and FHIR API (SQLite) and the console, all over HTTP: the review
panel of the study page (the AI's result; a blank conclusion refused at the field; the FHIR API
down: a message and the typed text kept; a result changed meanwhile shown again; signed, with
the conclusion's markup shown as text; the Observation amended in FHIR; an AuditEvent), an
operator refused the form and its POST, and the patient's page (timeline, prescribe, book,
answer a callback request; bad input named at the field); axe-core on each page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from devtools.kafka_local import free_port
from inference_worker.fhir_resources import all_resources_for
from scanwatch import care_plan, ids
from services.auth.scopes import Scope
from services.console.tests.test_web_browser import (
    SHOTS,
    Hospital,
    activate,
    audit_of,
    axe_check,
    hospital,
    sign_in,
    store_study,
)
from services.fhir_api.tests.test_search import scored

pytestmark = pytest.mark.integration
__all__ = ["hospital"]  # the fixture, shared with the staff pages' tests (browser, page: conftest)

MARKUP = "<script>window.pwned = 1</script><b>Glioma</b> & oedema, left temporal."


def write_result(hospital: Hospital, uid: str, p_normal: float = 0.3) -> str:
    """Everything the pipeline writes for a scored study; its Patient id."""
    study = scored(uid, f"PID-{uid[-3:]}", p_normal=p_normal)
    for resource in all_resources_for(study):
        answer = httpx.put(
            f"{hospital.fhir}/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers=hospital.system_headers(),
        )
        assert answer.status_code in (200, 201), answer.text
    return ids.patient_id("HOSP", study.PatientID)


def read(hospital: Hospital, path: str) -> dict:
    """A FHIR read or search as the pipeline (a system token)."""
    token, _ = hospital.tokens.issue("pipeline", [Scope.parse("system/*.read")])
    answer = httpx.get(f"{hospital.fhir}/{path}", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    result: dict = answer.json()
    return result


@pytest.fixture
def fhir_down(hospital: Hospital) -> Iterator[None]:
    """The console's FHIR client sent through a port nothing listens on (a real refused
    connection), then put back."""
    real = hospital.web.http
    hospital.web.http = httpx.AsyncClient(
        mounts={"http://": httpx.AsyncHTTPTransport(proxy=f"http://127.0.0.1:{free_port()}")}
    )
    yield
    hospital.web.http = real


def test_a_clinician_reviews_and_signs_a_result(
    hospital: Hospital, page: Page, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.71"
    store_study(hospital, tmp_path, uid, "Review^Rita", "20250301")
    write_result(hospital, uid)
    sign_in(page, hospital, "dr.ada")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    page.goto(f"{hospital.console}/studies/{uid}")
    panel = page.get_by_role("region", name="Review and sign")
    expect(panel.get_by_label("Class (confirm the AI's or correct it)")).to_be_visible()
    expect(panel).to_contain_text("glioma (score")
    expect(panel).to_contain_text("preliminary")
    axe_check(page, "the study page with its review panel")

    # A blank conclusion: refused at the field, nothing written.
    panel.get_by_label("Class (confirm the AI's or correct it)").select_option("normal")
    panel.get_by_role("button", name="Sign the result").click()
    expect(page.locator("#review-conclusion-error")).to_have_text(
        "a signed report needs a conclusion"
    )
    expect(page.get_by_label("Conclusion")).to_have_attribute("aria-invalid", "true")
    axe_check(page, "the review page with an error")

    # The FHIR API down: a clear message, and what was typed is still there.
    page.get_by_label("Class (confirm the AI's or correct it)").select_option("normal")
    page.get_by_label("Conclusion").fill(MARKUP)
    request.getfixturevalue("fhir_down")
    page.get_by_role("button", name="Sign the result").click()
    expect(page.get_by_role("alert")).to_contain_text("did not answer, so nothing was saved")
    expect(page.get_by_label("Conclusion")).to_have_value(MARKUP)

    observation_id = ids.observation_id(uid, "m", 1)
    assert read(hospital, f"Observation/{observation_id}")["status"] == "preliminary"


def test_review_outcomes_once_fhir_answers(hospital: Hospital, page: Page, tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.72"
    store_study(hospital, tmp_path, uid, "Review^Rob", "20250302")
    write_result(hospital, uid)
    sign_in(page, hospital, "dr.fay")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    page.goto(f"{hospital.console}/studies/{uid}/review")
    axe_check(page, "the review page")

    # A signature without the session's CSRF token is refused, and nothing is written.
    forged = page.request.post(
        f"{hospital.console}/studies/{uid}/review",
        form={"finding": "normal", "conclusion": "forged", "csrf_token": "forged"},
    )
    assert forged.status == 403

    # The result changes between the page and the signature: said, and shown as it is now.
    report_id = ids.diagnostic_report_id(uid, "m", 1)
    report = read(hospital, f"DiagnosticReport/{report_id}")
    changed = {k: v for k, v in report.items() if k != "meta"} | {"conclusion": "re-scored"}
    answer = httpx.put(
        f"{hospital.fhir}/DiagnosticReport/{report_id}",
        json=changed,
        headers=hospital.system_headers(),
    )
    assert answer.status_code == 200, answer.text
    page.get_by_label("Class (confirm the AI's or correct it)").select_option("normal")
    page.get_by_label("Conclusion").fill(MARKUP)
    page.get_by_role("button", name="Sign the result").click()
    expect(page.get_by_role("alert")).to_contain_text("changed while you were reviewing it")
    expect(page.get_by_label("Conclusion")).to_have_value(MARKUP)

    # Signed: who and when, the conclusion shown as text (its markup not run).
    page.get_by_label("Class (confirm the AI's or correct it)").select_option("normal")
    page.get_by_role("button", name="Sign the result").click()
    expect(page.get_by_role("status")).to_contain_text("Signed by you (Practitioner/")
    expect(page.get_by_role("status")).to_contain_text("(corrected)")
    expect(page.locator("dd.conclusion")).to_have_text(MARKUP)
    assert page.evaluate("window.pwned") is None
    assert page.locator("dd.conclusion script, dd.conclusion b").count() == 0
    expect(page.get_by_role("button", name="Sign the result")).to_have_count(0)
    axe_check(page, "the signed review")
    # The study page's header now says the result is the clinician's, not the AI's.
    page.goto(f"{hospital.console}/studies/{uid}")
    expect(page.get_by_text("Result (reviewed)")).to_be_visible()
    expect(page.get_by_text("signed by a clinician (amended)")).to_be_visible()

    observation = read(hospital, f"Observation/{ids.observation_id(uid, 'm', 1)}")
    assert observation["status"] == "amended"
    final = read(hospital, f"DiagnosticReport/{report_id}")
    assert (final["status"], final["conclusion"]) == ("final", MARKUP)
    events = audit_of(hospital, "dr.fay")
    signed = [e for e in events if "review signed" in e.get("outcomeDesc", "")]
    assert len(signed) == 1 and signed[0]["action"] == "U"
    assert signed[0]["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{uid}"


def test_an_operator_gets_no_review_or_patient_page(
    hospital: Hospital, page: Page, tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.73"
    patient = write_result(hospital, uid)
    sign_in(page, hospital, "ops.bob")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    for path in (f"/studies/{uid}/review", f"/patients/{patient}"):
        answer = page.goto(f"{hospital.console}{path}")
        assert answer is not None and answer.status == 403, path
    form = {"finding": "normal", "conclusion": "fine", "csrf_token": "x"}
    posted = page.request.post(f"{hospital.console}/studies/{uid}/review", form=form)
    assert posted.status == 403
    prescribed = page.request.post(
        f"{hospital.console}/patients/{patient}/medications", form={"medication": "x"}
    )
    assert prescribed.status == 403
    assert read(hospital, f"Observation/{ids.observation_id(uid, 'm', 1)}")["status"] == (
        "preliminary"
    )


def test_the_clinicians_patient_page(hospital: Hospital, page: Page, tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.74"
    store_study(hospital, tmp_path, uid, "Patient^Pat", "20250303")
    patient = write_result(hospital, uid, p_normal=0.8)
    asked = care_plan.callback_request(
        patient, authored_on=datetime.now(UTC) - timedelta(hours=2), reason="Please call me <b>"
    )
    created = httpx.post(
        f"{hospital.fhir}/CommunicationRequest", json=asked, headers=hospital.system_headers()
    )
    assert created.status_code == 201, created.text
    sign_in(page, hospital, "dr.eve")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    page.goto(f"{hospital.console}/studies/{uid}")
    page.get_by_role("link", name="The patient's page").click()
    expect(page).to_have_url(f"{hospital.console}/patients/{patient}")
    expect(page.get_by_role("heading", name="Results")).to_be_visible()
    expect(page.locator("table.worklist tbody tr")).to_have_count(1)
    expect(page.get_by_text("Please call me <b>")).to_be_visible()
    axe_check(page, "the patient page")

    # Bad input: named at the field, what was typed kept.
    page.get_by_label("Dosage").fill("4 mg twice a day")
    page.get_by_role("button", name="Prescribe").click()
    expect(page.locator("#medication-error")).to_have_text("Medication: say what to prescribe.")
    expect(page.get_by_label("Dosage")).to_have_value("4 mg twice a day")
    page.get_by_label("Date").fill("2020-01-01")
    page.get_by_label("Reason").fill("Follow-up after the MRI")
    page.get_by_role("button", name="Book").click()
    expect(page.locator("#day-error")).to_have_text("Date: the follow-up must be in the future.")
    axe_check(page, "the patient page with an error")

    page.get_by_label("Medication", exact=True).fill("Dexamethasone 4 mg tablet")
    page.get_by_label("Dosage").fill("4 mg twice a day")
    page.get_by_role("button", name="Prescribe").click()
    expect(page.get_by_role("status")).to_have_text("The prescription was saved.")
    expect(page.get_by_text("Dexamethasone 4 mg tablet – 4 mg twice a day")).to_be_visible()

    soon = (datetime.now() + timedelta(days=14)).date().isoformat()
    page.get_by_label("Date").fill(soon)
    page.get_by_label("Time").fill("10:30")
    page.get_by_label("Reason").fill("Follow-up after the MRI")
    page.get_by_role("button", name="Book").click()
    expect(page.get_by_role("status")).to_have_text("The follow-up was booked.")
    expect(page.get_by_text("Follow-up after the MRI")).to_be_visible()

    page.get_by_role("button", name="Mark done").click()
    expect(page.get_by_role("alert").first).to_contain_text("Not saved")
    page.get_by_label("Note on the call").fill("Called back; result explained.")
    page.get_by_role("button", name="Mark done").click()
    expect(page.get_by_role("status")).to_have_text("The callback request was updated.")
    # The note's time reads as every other time on the page does, not as a raw FHIR instant.
    note = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC: Called back; result explained\.$")
    expect(page.get_by_text(note)).to_be_visible()
    expect(page.get_by_role("button", name="Mark done")).to_have_count(0)
    axe_check(page, "the patient page after the writes")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "patient-page.png"), full_page=True)

    bundle = read(hospital, f"MedicationRequest?patient={patient}")
    (prescription,) = [e["resource"] for e in bundle["entry"]]
    assert prescription["requester"]["reference"].startswith("Practitioner/")
    callback = read(hospital, f"CommunicationRequest/{created.json()['id']}")
    assert callback["status"] == "completed"


def test_a_signature_racing_another_change_is_a_412_shown_as_changed(
    hospital: Hospital, page: Page, tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.75"
    store_study(hospital, tmp_path, uid, "Review^Ray", "20250304")
    write_result(hospital, uid)
    report_id = ids.diagnostic_report_id(uid, "m", 1)
    base = hospital.fhir.removesuffix("/fhir")
    hospital.totp["dr.gus"] = activate(base, hospital.engine, "dr.gus", "clinician")
    sign_in(page, hospital, "dr.gus")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    page.goto(f"{hospital.console}/studies/{uid}/review")

    async def change_the_report_first(request: httpx.Request) -> None:
        # The console has read the result and checked its versions; the transaction is on
        # its way when the report changes: only the FHIR API's ifMatch can catch it.
        if request.method == "POST" and request.url.path.endswith("/fhir"):
            report = read(hospital, f"DiagnosticReport/{report_id}")
            changed = {k: v for k, v in report.items() if k != "meta"} | {"conclusion": "new"}
            async with httpx.AsyncClient() as other:
                answer = await other.put(
                    f"{hospital.fhir}/DiagnosticReport/{report_id}",
                    json=changed,
                    headers=hospital.system_headers(),
                )
            assert answer.status_code == 200, answer.text

    real = hospital.web.http
    hospital.web.http = httpx.AsyncClient(event_hooks={"request": [change_the_report_first]})
    try:
        page.get_by_label("Conclusion").fill("Agree.")
        page.get_by_role("button", name="Sign the result").click()
        expect(page.get_by_role("alert")).to_contain_text("changed while you were reviewing it")
        expect(page.get_by_label("Conclusion")).to_have_value("Agree.")
    finally:
        hospital.web.http = real
    observation = read(hospital, f"Observation/{ids.observation_id(uid, 'm', 1)}")
    assert (observation["status"], observation["meta"]["versionId"]) == ("preliminary", "1")
    # The form now carries the new versions: signing again works.
    page.get_by_role("button", name="Sign the result").click()
    expect(page.get_by_role("status")).to_contain_text("Signed by you")
