"""The full path of issue 17 in a real browser (Chromium via Playwright), on the stack that
``scanwatch run`` starts (devtools.stack: Kafka, the listener, the worker, the model server with
the shipped default model, the FHIR API and its authorization server, the portal, the console):
a study sent with dcmtk's storescu is shown scored on the worklist, opened in the viewer, its
result corrected and signed by the banner's development clinician with a conclusion holding
markup, then the patient signs in to the portal and sees the signed conclusion, as text.
Screenshots: var/screenshots/console/review.png and patient.png."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import KAFKA_LIBS, ROOT
from devtools import cli
from devtools.browser import launch_options
from devtools.kafka_local import free_port
from devtools.peers import storescu
from devtools.stack import Ports, Stack, StackConfig
from devtools.testing import wait_for
from scanwatch.sample import build_mr_study

pytestmark = pytest.mark.e2e

AXE = ROOT / "services" / "portal" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = ROOT / "var" / "screenshots" / "console"
PASSWORD = "a-long-pass phrase for the console path"
CONCLUSION = "<script>window.pwned = 1</script>No <b>mass</b> seen & no oedema."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default model (with its heatmap signature) as version 1."""
    from training.default_model import ensure_default_model

    repository = tmp_path_factory.mktemp("models")
    ensure_default_model(repository)
    return repository


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Stack]:
    config = StackConfig(
        var=tmp_path_factory.mktemp("console-path"),
        ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
        quiet_period_s=2.0,
        models=models,
        kafka_libs=KAFKA_LIBS,
        chatbot=True,  # tokens required: the portal and the console run
        only=(
            "model-server",
            "fhir-api",
            "inference-worker",
            "dicom-listener",
            "portal",
            "console",
        ),
    )
    running = Stack(config)
    try:
        running.start(timeout=300)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**launch_options())
        yield chromium
        chromium.close()


def axe_check(page: Page, what: str) -> None:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length}))"
    )
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not bad, f"axe-core on {what}: {bad}"


def banner_login(stack: Stack) -> tuple[str, str]:
    found = re.search(r"\(development login: (\S+) / (\S+),", stack.banner())
    assert found is not None, stack.banner()
    username, password = found.groups()
    return username, password


def test_a_study_from_storescu_to_a_signed_conclusion_in_the_portal(
    stack: Stack, browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = build_mr_study(tmp_path / "study", patient_id="SW-E2E-CONSOLE", n_slices=20)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    uid = header.StudyInstanceUID
    storescu(files, "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title)
    console = f"http://127.0.0.1:{stack.config.ports.console}"

    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    context.set_default_timeout(20_000)
    page = context.new_page()
    username, password = banner_login(stack)
    page.goto(f"{console}/signin")
    page.get_by_role("link", name="Sign in").click()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{console}/worklist")

    # The worklist updates live: the study appears, then scored.
    row = page.locator(f'tr[data-study="{uid}"]')
    expect(row).to_contain_text("Scored", timeout=180_000)
    row.get_by_role("link").first.click()
    expect(page).to_have_url(f"{console}/studies/{uid}")
    expect(page.get_by_role("img", name=re.compile(r"^Slice"))).to_be_visible()
    # The heatmaps are written after the score (they never delay it): a clinician who opens
    # the study at once reads "no heatmap" and sees it on opening the study again.
    heatmap = page.get_by_role("checkbox", name="Show AI heatmap")
    # The page says "Slice 0 of 0" until the viewer has read the study, and only then hides the
    # heatmap controls (in the page from the start) if it found no heatmap series.
    loaded = page.get_by_role("img", name=re.compile(r"^Slice [1-9]"))

    def heatmap_shown() -> bool:
        expect(loaded).to_be_visible()
        if heatmap.is_visible():
            return True
        page.reload()
        return False

    wait_for(heatmap_shown, 120, "the study's heatmap in the viewer")
    expect(heatmap).to_be_visible()

    # Review: the AI's result, corrected, signed with markup in the conclusion.
    panel = page.get_by_role("region", name="Review and sign")
    choose = panel.get_by_label("Class (confirm the AI's or correct it)")
    expect(choose).to_be_visible()
    expect(panel).to_contain_text("preliminary")
    ai_class = choose.input_value()
    other = next(
        o
        for o in choose.locator("option").evaluate_all("os => os.map(o => o.value)")
        if o != ai_class
    )
    choose.select_option(other)
    panel.get_by_label("Conclusion").fill(CONCLUSION)
    panel.get_by_role("button", name="Sign the result").click()
    panel = page.get_by_role("region", name="Review and sign")
    expect(panel.get_by_role("status")).to_contain_text("Signed by", timeout=20_000)
    expect(panel.get_by_role("status")).to_contain_text("(corrected)")
    expect(panel.locator("dd.conclusion")).to_have_text(CONCLUSION)
    assert page.evaluate("window.pwned") is None
    axe_check(page, "the study page, signed")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "review.png"), full_page=True)

    # The patient's page: the signed result in the timeline.
    panel.get_by_role("link", name="The patient's page").click()
    expect(page.get_by_role("heading", name="Results")).to_be_visible()
    expect(page.locator("td.conclusion")).to_have_text(CONCLUSION)
    axe_check(page, "the patient page")
    page.screenshot(path=str(SHOTS / "patient.png"), full_page=True)
    context.close()

    # The patient signs in to the portal and sees the clinician's conclusion, as text.
    monkeypatch.setenv("SCANWATCH_AUTH_ISSUER", f"http://127.0.0.1:{stack.config.ports.fhir}")
    issuer = header.get("IssuerOfPatientID") or None
    link = cli.invite_link(stack.config.var, header.PatientID, issuer)
    portal = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    portal.set_default_timeout(20_000)
    patient = portal.new_page()
    patient.goto(link)
    patient.get_by_label("Username").fill("console-path-patient")
    patient.get_by_label("New password", exact=True).fill(PASSWORD)
    patient.get_by_label("New password again").fill(PASSWORD)
    patient.get_by_role("button", name="Create my account").click()
    expect(patient.get_by_text("Your account is ready")).to_be_visible()
    patient.goto(f"{stack.config.portal_url}/signin")
    patient.get_by_role("link", name="Sign in").click()
    patient.get_by_label("Username").fill("console-path-patient")
    patient.get_by_label("Password", exact=True).fill(PASSWORD)
    patient.get_by_role("button", name="Sign in").click()
    scans = patient.get_by_role("list", name="Scans").get_by_role("listitem")
    expect(scans).to_have_count(1)
    expect(scans.first).to_contain_text("Reviewed by a clinician")
    expect(scans.first).to_contain_text(CONCLUSION)
    assert patient.evaluate("window.pwned") is None
    portal.close()
