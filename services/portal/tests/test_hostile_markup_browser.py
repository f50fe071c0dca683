"""Markup in DICOM strings and in what the chatbot says, on the patient portal in a real
browser (Chromium via Playwright): the study description (DICOM StudyDescription, carried by
ImagingStudy.description), the model's name, a clinician's conclusion, a medicine, a visit and
the chatbot's replies and buttons hold script tags, attribute break-outs and ``javascript:``
URLs. The results list with its chart table, a result's page, the care page and the chat (a
form post and the script's own rendering of a reply) show them as text; no script runs (a
``dialog`` handler, a window flag, the page's ``securitypolicyviolation`` record stays empty:
nothing even reached the CSP), and the CSP header holds.

The portal runs in this process against the fake hospital of ``fakes.py`` (real ES256 tokens,
the patient compartment), served over HTTP for the browser; the session is signed in over
HTTP and handed to the browser as its cookie."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from devtools import chatbot_records
from devtools.browser import launch_options
from devtools.kafka_local import free_port
from devtools.testing import served
from services.auth.web_security import CONTENT_SECURITY_POLICY
from services.portal.app import create_app
from services.portal.tests.fakes import ALICE, CHAT, FakeHospital, settings

pytestmark = pytest.mark.integration

STUDY = "<script>alert('study')</script> MR brain"
MODEL = '"><img src=x onerror="window.pwned=1"> v7'
CONCLUSION = "<svg onload=\"window.pwned='report'\"></svg> Stable."
MEDICINE = "<iframe src=\"javascript:window.pwned='med'\"></iframe> Levetiracetam"
VISIT = "javascript:alert('visit') <b>follow-up</b>"
RECEIVED = "<img src=x onerror=\"alert('received')\"> CT head"
CLINICIAN = "<script>alert('dr')</script>Dr. Who"
BOT = "<img src=x onerror=\"alert('bot')\"> Your latest scan"
BUTTON = "<script>alert('button')</script>Yes"
SAID = "<script>alert('me')</script> how am I?"
WATCH = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
    e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


def hostile_records() -> dict[str, list[dict[str, Any]]]:
    """Alice's records with markup in every string the portal shows."""
    records = {
        chatbot_records.patient_id(p): copy.deepcopy(rs)
        for p, rs in chatbot_records.records().items()
    }
    for resource in records[ALICE]:
        kind = resource["resourceType"]
        if kind == "ImagingStudy":
            resource["description"] = STUDY
        elif kind == "Observation":
            resource["device"]["display"] = MODEL
        elif kind == "DiagnosticReport" and resource.get("conclusion"):
            resource["conclusion"] = CONCLUSION
            for interpreter in resource.get("resultsInterpreter", []):
                interpreter["display"] = CLINICIAN
        elif kind == "MedicationRequest":
            resource["medicationCodeableConcept"] = {"text": MEDICINE}
        elif kind == "Appointment":
            resource["description"] = VISIT
    # A study received and not yet scored (listed apart, under its description).
    study = next(r for r in records[ALICE] if r["resourceType"] == "ImagingStudy")
    waiting = copy.deepcopy(study) | {"id": "hostile-received", "status": "registered"}
    waiting |= {"description": RECEIVED, "started": "2025-06-01T08:00:00Z"}
    records[ALICE].append(waiting)
    return records


@pytest.fixture(scope="module")
def portal(signing_keys: Path) -> Iterator[tuple[str, FakeHospital]]:
    hospital = FakeHospital(signing_keys, records=hostile_records())

    def handle(request: httpx.Request) -> httpx.Response:
        if str(request.url) == CHAT:  # the chatbot: replies and buttons full of markup
            hospital.chat_seen.append((None, request.content.decode()))
            reply = [{"text": BOT, "buttons": [{"title": BUTTON, "payload": "/affirm"}]}]
            return httpx.Response(200, json=reply)
        return hospital.handle(request)

    port = free_port()
    app = create_app(
        settings(port=port), transport=httpx.MockTransport(handle), verifier=hospital.verify
    )
    with served(app, port):
        yield f"http://127.0.0.1:{port}", hospital


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**launch_options())
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, portal: tuple[str, FakeHospital]) -> Iterator[Page]:
    """A tab whose context holds Alice's signed-in session (signed in over HTTP)."""
    url, hospital = portal
    with httpx.Client(base_url=url, follow_redirects=False) as client:
        start = client.get("/login")
        code, state = hospital.authorize(start.headers["location"], ALICE)
        assert client.get("/callback", params={"code": code, "state": state}).status_code == 303
        cookies = [{"name": c.name, "value": c.value or "", "url": url} for c in client.cookies.jar]
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    context.set_default_timeout(20_000)
    context.add_cookies(cookies)  # type: ignore[arg-type]
    tab = context.new_page()
    yield tab
    context.close()


def watched(page: Page) -> list[str]:
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.add_init_script(WATCH)
    return dialogs


def assert_inert(page: Page, dialogs: list[str], what: str) -> None:
    assert dialogs == [], f"{what}: a dialog opened: {dialogs}"
    assert page.evaluate("window.pwned") is None, f"{what}: a script from the records ran"
    assert page.evaluate("window.__violations") == [], f"{what}: markup reached the DOM"
    injected = "img[src=x], svg, iframe, script:not([src]), main b"
    assert page.locator(injected).count() == 0, f"{what}: markup became elements"


def opened(page: Page, url: str) -> None:
    answer = page.goto(url)
    assert answer is not None and answer.status == 200, url
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_records_with_markup_are_shown_as_text(
    page: Page, portal: tuple[str, FakeHospital]
) -> None:
    url, _hospital = portal
    dialogs = watched(page)
    opened(page, f"{url}/")
    main = page.locator("main")
    expect(main).to_contain_text(STUDY)  # the results list
    expect(main).to_contain_text(RECEIVED)  # a study still being analysed
    # The chart is drawn on a canvas from its data table (dates and scores, no record text).
    expect(page.locator("#progress-data tbody tr")).to_have_count(3)
    expect(page.locator("#progress-chart")).to_be_visible()
    assert_inert(page, dialogs, "the results list")

    detail = page.locator('a[href^="/results/"]').first.get_attribute("href")
    assert detail is not None
    opened(page, f"{url}{detail}")
    expect(main).to_contain_text(STUDY)
    expect(main).to_contain_text(MODEL.rpartition(" v")[0])
    assert_inert(page, dialogs, "a result's page")
    reviewed = [
        r["id"]
        for r in hostile_records()[ALICE]
        if r["resourceType"] == "Observation" and r.get("status") in ("final", "amended")
    ]
    assert reviewed, "Alice's records have a result a clinician signed"
    for observation_id in reviewed:
        opened(page, f"{url}/results/{observation_id}")
        expect(main).to_contain_text(CONCLUSION)
        expect(main).to_contain_text(CLINICIAN)
        assert_inert(page, dialogs, "a reviewed result's page")

    opened(page, f"{url}/care")
    expect(main).to_contain_text(MEDICINE)
    expect(main).to_contain_text(VISIT)
    assert_inert(page, dialogs, "the care page")


def test_chat_replies_with_markup_are_shown_as_text(
    page: Page, portal: tuple[str, FakeHospital]
) -> None:
    url, _hospital = portal
    dialogs = watched(page)
    opened(page, f"{url}/chat")
    # Sent by the page's script (JSON back, drawn with textContent).
    page.get_by_label("Your message").fill(SAID)
    page.get_by_role("button", name="Send").click()
    log = page.locator("#chat-log")
    expect(log).to_contain_text(SAID)
    expect(log).to_contain_text(BOT)
    expect(page.get_by_role("button", name=BUTTON)).to_be_visible()
    assert_inert(page, dialogs, "the chat, drawn by its script")
    # The same conversation drawn by the server's template (a reload).
    opened(page, f"{url}/chat")
    expect(log).to_contain_text(SAID)
    expect(log).to_contain_text(BOT)
    expect(page.get_by_role("button", name=BUTTON).first).to_be_visible()
    assert_inert(page, dialogs, "the chat, drawn by the server")
