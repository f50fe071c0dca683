"""Fixtures of the console's browser tests: Debian's Chromium through Playwright, one browser
per test module, a fresh context (cookies, storage) per test. A test that fails leaves what
its tab showed (a screenshot and the HTML) under var/screenshots/console/failed/."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, Page, sync_playwright

from devtools.browser import launch_options

FAILED = Path(__file__).resolve().parents[3] / "var" / "screenshots" / "console" / "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Each phase's report kept on the test item, for the ``page`` fixture's teardown."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**launch_options())
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-GB")
    context.set_default_timeout(20_000)
    tab = context.new_page()
    yield tab
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        FAILED.mkdir(parents=True, exist_ok=True)
        with suppress(Error):  # a tab that crashed has nothing to show
            tab.screenshot(path=FAILED / f"{request.node.name}.png", full_page=True)
            (FAILED / f"{request.node.name}.html").write_text(tab.content())
    context.close()
