"""The activation and sign-in pages in Chromium at a phone's width, driven by the keyboard
alone: every field reached with Tab, the forms sent with Enter, the code delivered to the app
through the page's CSP (``form-action`` covers the redirect), no horizontal scrolling, and
axe-core (the portal's npm copy) finds no serious or critical violation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, sync_playwright

from devtools.browser import launch_options
from devtools.testing import served
from services.auth import accounts
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.smart_helpers import (
    PASSWORD,
    REDIRECT_URI,
    authorization,
    patient_of,
    register_app,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
AXE = ROOT / "services" / "portal" / "node_modules" / "axe-core" / "axe.min.js"
PHONE = {"width": 360, "height": 740}


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing (scripts/bootstrap.sh runs npm ci in services/portal)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**launch_options())
        context = browser.new_context(viewport=PHONE)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def axe_violations(page: Page) -> list[dict]:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    found = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.length}))"
    )
    return [v for v in found if v["impact"] in ("serious", "critical")]


def fits_a_phone(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_the_pages_work_on_a_phone_with_the_keyboard_alone(
    page: Page, tmp_path: Path, signing_keys: Path
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
        auth_mode="required",
        signing_keys_file=signing_keys,
    )
    app = create_app(settings)
    with served(app, 0) as port:
        base = f"http://127.0.0.1:{port}"
        engine = app.state.store.engine
        register_app(engine)
        token = accounts.invite_patient(engine, patient_of("ALICE"))
        page.goto(f"{base}/auth/activate?{urlencode({'token': token})}")
        assert axe_violations(page) == [] and fits_a_phone(page)
        for text in ("alice", PASSWORD, PASSWORD):
            page.keyboard.press("Tab")
            page.keyboard.type(text)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.locator("h1").inner_text() == "Your account is ready"
        assert axe_violations(page) == []

        request = authorization(f"{base}/fhir")
        page.goto(f"{base}/auth/authorize?{urlencode(request.params)}")
        assert axe_violations(page) == [] and fits_a_phone(page)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "username"
        page.keyboard.type("alice")
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        with page.expect_request(lambda r: r.url.startswith(REDIRECT_URI)) as sent:
            page.keyboard.press("Enter")
        assert f"state={request.state}" in sent.value.url and "code=" in sent.value.url
