"""Markup in DICOM strings, in a real browser (Chromium via Playwright), on every console page
that shows them: a study whose PatientName, StudyDescription, SeriesDescription,
InstitutionName, ReferringPhysicianName and AccessionNumber hold script tags, attribute
break-outs and ``javascript:`` URLs, in the file store as the listener stores it and in FHIR as
the worker writes it. The worklist (clinician and operator, with a failed study's dead-letter
reason quoting them), the study page with its viewer, the review page and the patient's page
show the text literally; no script runs (a ``dialog`` handler, a window flag, the page's own
``securitypolicyviolation`` record stays empty: nothing was even blocked by the CSP) and the
CSP header holds; DICOMweb's JSON carries the strings as JSON strings under its own media type,
never as HTML.

The servers and accounts are the staff pages' (``test_web_browser.hospital``: the FHIR API
with its authorization server and the console, served in this process)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from playwright.sync_api import Page, expect

from dicom_listener.adapters.filestore import FileStore
from inference_worker.fhir_resources import all_resources_for
from scanwatch import ids
from services.auth.scopes import Scope
from services.auth.web_security import CONTENT_SECURITY_POLICY
from services.console.tests.helpers import put, relabelled
from services.console.tests.test_web_browser import MR, Hospital, hospital, sign_in
from services.fhir_api.tests.test_search import scored

pytestmark = pytest.mark.integration
__all__ = ["hospital"]  # the fixture, shared with the staff pages' tests (browser, page: conftest)

UID = "1.2.826.0.1.3680043.8.498.666"
SERIES = f"{UID}.1"
#: A study the pipeline failed on: the worklist shows its dead letter's reason.
FAILED = "1.2.826.0.1.3680043.8.498.667"
REASON = "<script>alert('reason')</script> no pixel data in '\"><img src=x onerror=alert(2)>'"
PATIENT_ID = "PID-666"
#: DICOM string attribute → what a hostile scanner or PACS put in it.
HOSTILE = {
    # No '=' in a PN: it separates the name's alphabetic, ideographic and phonetic forms.
    "PatientName": "<script>alert('name')</script>",
    "StudyDescription": '"><img src=x onerror="window.pwned=1">',
    "SeriesDescription": "<svg onload=\"window.pwned='series'\">",
    "InstitutionName": "<iframe src=\"javascript:window.pwned='inst'\">",
    "ReferringPhysicianName": "javascript:alert(1)",
    "AccessionNumber": "'\"><b>acc",
}
#: Records what a page's CSP refused and any dialog (alert, confirm, prompt) it opened.
WATCH = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
    e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture(scope="module")
def hostile_patient(hospital: Hospital, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The hostile study in the file store (two instances, as the listener stores them) and
    its results in FHIR (as the worker writes them); its Patient's id."""
    tmp = tmp_path_factory.mktemp("hostile")
    for uid, n in ((UID, 2), (FAILED, 1)):
        for i in range(n):
            source = relabelled(
                MR,
                tmp / f"{uid}-{i}.dcm",
                StudyInstanceUID=uid,
                SeriesInstanceUID=f"{uid}.1",
                SOPInstanceUID=f"{uid}.1.{i + 1}",
                PatientID=PATIENT_ID,
                StudyDate="20250303",
                StudyTime="083000",
                **HOSTILE,
            )
            put(FileStore(hospital.store), source)
    # The pipeline gave up on the second study (a dead letter), its reason quoting the header.
    hospital.web.worklist.store_failure(FAILED, "dicom.study.ready.v1", REASON, "Unusable")
    study = dataclasses.replace(
        scored(UID, PATIENT_ID, day=3),
        PatientName=HOSTILE["PatientName"],
        StudyDescription=HOSTILE["StudyDescription"],
        AccessionNumber=HOSTILE["AccessionNumber"],
    )
    for resource in all_resources_for(study):
        answer = httpx.put(
            f"{hospital.fhir}/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers=hospital.system_headers(),
        )
        assert answer.status_code in (200, 201), answer.text
    return ids.patient_id("HOSP", PATIENT_ID)


def watched(page: Page) -> list[str]:
    """Dialogs the page opens (each one a script that ran), recorded for the test to check."""
    dialogs: list[str] = []

    def on_dialog(dialog: object) -> None:
        dialogs.append(getattr(dialog, "message", "?"))
        dialog.dismiss()  # type: ignore[attr-defined]

    page.on("dialog", on_dialog)
    page.add_init_script(WATCH)
    return dialogs


def assert_inert(page: Page, dialogs: list[str], what: str) -> None:
    """No dialog, no flag, nothing the CSP had to block, no element made from the strings."""
    assert dialogs == [], f"{what}: a dialog opened: {dialogs}"
    assert page.evaluate("window.pwned") is None, f"{what}: a script from DICOM ran"
    assert page.evaluate("window.__violations") == [], f"{what}: markup reached the DOM"
    injected = "img[src=x], svg[onload], iframe, script:not([src]), b"
    assert page.locator(injected).count() == 0, f"{what}: markup became elements"


def opened(page: Page, url: str) -> None:
    answer = page.goto(url)
    assert answer is not None and answer.status == 200, url
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_a_clinician_sees_dicom_markup_as_text_everywhere(
    hospital: Hospital, page: Page, hostile_patient: str
) -> None:
    dialogs = watched(page)
    sign_in(page, hospital, "dr.ada")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    shown_name = HOSTILE["PatientName"]  # no '^' in it: shown as stored

    opened(page, f"{hospital.console}/worklist")
    row = page.locator(f'tr[data-study="{UID}"]')
    expect(row).to_contain_text(shown_name)
    expect(row).to_contain_text(HOSTILE["StudyDescription"])
    expect(page.locator(f'tr[data-study="{FAILED}"] .reason')).to_have_text(REASON)
    assert_inert(page, dialogs, "the worklist")

    opened(page, f"{hospital.console}/studies/{UID}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(shown_name)
    expect(page.locator("main")).to_contain_text(HOSTILE["StudyDescription"])
    # The viewer names the series from DICOMweb (textContent) once its images are read.
    expect(page.locator("main")).to_contain_text(HOSTILE["SeriesDescription"])
    assert_inert(page, dialogs, "the study page and its viewer")

    opened(page, f"{hospital.console}/studies/{UID}/review")
    expect(page.locator("main")).to_contain_text(UID)
    assert_inert(page, dialogs, "the review page")

    opened(page, f"{hospital.console}/patients/{hostile_patient}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(shown_name)
    assert_inert(page, dialogs, "the patient's page")

    # The viewer's DICOMweb (behind the session) and the API: JSON, the strings as they are.
    metadata = page.request.get(
        f"{hospital.console}/viewer/dicomweb/studies/{UID}/series/{SERIES}/metadata"
    )
    assert metadata.status == 200
    assert metadata.headers["content-type"].startswith("application/dicom+json")
    first = metadata.json()[0]
    assert first["00081030"]["Value"] == [HOSTILE["StudyDescription"]]
    assert first["0008103E"]["Value"] == [HOSTILE["SeriesDescription"]]
    assert first["00100010"]["Value"] == [{"Alphabetic": HOSTILE["PatientName"]}]
    api = page.request.get(f"{hospital.console}/api/studies/{UID}")
    assert api.status == 200 and api.headers["content-type"].startswith("application/json")
    assert api.json()["StudyDescription"] == HOSTILE["StudyDescription"]


def test_an_operator_sees_dicom_markup_as_text_in_the_worklist(
    hospital: Hospital, page: Page, hostile_patient: str
) -> None:
    dialogs = watched(page)
    sign_in(page, hospital, "ops.bob")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    opened(page, f"{hospital.console}/worklist")
    row = page.locator(f'tr[data-study="{UID}"]')
    expect(row).to_contain_text(HOSTILE["PatientName"])
    expect(row).to_contain_text(HOSTILE["StudyDescription"])
    expect(page.locator(f'tr[data-study="{FAILED}"] .reason')).to_have_text(REASON)
    assert_inert(page, dialogs, "the operator's worklist")


def test_dicomweb_answers_markup_as_json_only(hospital: Hospital, hostile_patient: str) -> None:
    """QIDO-RS and WADO-RS metadata with a staff token: ``application/dicom+json``, every
    string a JSON string; a rendered frame is an image; markup in a search value is not
    echoed into HTML."""
    token, _ = hospital.tokens.issue("viewer", [Scope.parse("system/*.read")])
    bearer = {"Authorization": f"Bearer {token}"}
    base = f"{hospital.console}/dicomweb"
    studies = httpx.get(
        f"{base}/studies",
        params={"StudyInstanceUID": UID, "includefield": "all"},
        headers=bearer,
    )
    assert studies.status_code == 200, studies.text
    assert studies.headers["content-type"].startswith("application/dicom+json")
    (found,) = studies.json()
    assert found["00100010"]["Value"] == [{"Alphabetic": HOSTILE["PatientName"]}]
    assert found["00080090"]["Value"] == [{"Alphabetic": HOSTILE["ReferringPhysicianName"]}]
    series = httpx.get(f"{base}/studies/{UID}/series", headers=bearer)
    assert series.json()[0]["0008103E"]["Value"] == [HOSTILE["SeriesDescription"]]
    metadata = httpx.get(f"{base}/studies/{UID}/metadata", headers=bearer)
    assert metadata.headers["content-type"].startswith("application/dicom+json")
    assert metadata.json()[0]["00080080"]["Value"] == [HOSTILE["InstitutionName"]]
    rendered = httpx.get(
        f"{base}/studies/{UID}/series/{SERIES}/instances/{SERIES}.1/rendered",
        headers=bearer | {"Accept": "image/png"},
    )
    assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/png"
    assert rendered.content.startswith(b"\x89PNG")
    # A search value full of markup is answered as JSON, not echoed into a page.
    odd = httpx.get(
        f"{base}/studies", params={"PatientName": HOSTILE["PatientName"]}, headers=bearer
    )
    assert odd.status_code in (200, 204, 400)
    assert "text/html" not in odd.headers.get("content-type", "")
