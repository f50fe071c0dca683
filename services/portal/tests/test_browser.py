"""The patient portal in a real browser (Debian's Chromium driven by Playwright) against the
real FHIR API with its SMART authorization server, the Rasa chatbot and its action server, and
the portal as ``scanwatch run`` starts it (one :class:`devtools.stack.Stack`).

- the main path: invite, activate, sign in, the results list, a chart with one point per study,
  a new result appearing without a reload, one result in detail, the chat answering about the
  latest scan, medicines and visits, sign out;
- isolation: two patients signed in at once; every page and route of the portal tried with the
  other patient's identifiers;
- bad inputs: a wrong password, an expired and a reused invite, a tampered ``state``, a wrong
  PKCE verifier (at the HTTP level), an expired session (a second portal in this process, whose
  clock the test moves);
- axe-core (from the local npm copy) on every page: no serious or critical violations;
- screenshots of the main pages at desktop and phone widths in ``var/screenshots/portal/``.

Waits are on conditions (Playwright's ``expect``), never sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlmodel import Session, col, select

from conftest import ROOT
from devtools import chatbot_records, cli
from devtools.browser import launch_options
from devtools.cli import dev_tokens
from devtools.kafka_local import free_port
from devtools.stack import PORTAL_CLIENT, Ports, Stack, StackConfig
from devtools.testing import served
from inference_worker.fhir_resources import (
    ScoredStudy,
    all_resources_for,
    registered_resources_for,
)
from scanwatch.database import make_engine
from services.auth import accounts
from services.auth.clients import register_app
from services.auth.scopes import parse_scopes
from services.auth.store import RefreshToken
from services.portal.app import create_app
from services.portal.config import Settings

pytestmark = pytest.mark.integration

CHAT_MODELS = ROOT / "var" / "chatbot" / "models"
AXE = ROOT / "services" / "portal" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = ROOT / "var" / "screenshots" / "portal"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
ALICE, BOB = chatbot_records.ALICE, chatbot_records.BOB
ALICE_ID, BOB_ID = chatbot_records.patient_id(ALICE), chatbot_records.patient_id(BOB)
#: The main path's own patient (Alice's kind of records), so that it activates its account
#: without renaming the accounts the other tests sign in with (one account per patient).
MAIN = "PORTAL-MAIN"
#: Patients without records, for the tests of activation and sign-in refusals.
CAROL, DAVE = "PORTAL-CAROL", "PORTAL-DAVE"
PASSWORD = "a-long-pass phrase for tests 42"
#: What only Bob's records say: none of it may reach Alice's pages.
BOBS_FACTS = ("3 June 2025", "Dexamethasone", "20 January 2031")
#: The second portal (in this process, its clock moved by the tests).
TEST_CLIENT = "scanwatch-portal-test"


@dataclass
class Hospital:
    stack: Stack
    engine_url: str
    test_portal: str  # the in-process portal's URL
    clock: list[float]  # its clock's offset (seconds added to time.monotonic)
    test_secret: str

    @property
    def portal(self) -> str:
        return self.stack.config.portal_url

    @property
    def auth(self) -> str:
        return f"http://127.0.0.1:{self.stack.config.ports.fhir}"

    def invite(
        self, patient_id: str, lifetime: timedelta = timedelta(hours=1), now: datetime | None = None
    ) -> str:
        """The activation link staff would hand the patient (``scanwatch patients invite``)."""
        engine = make_engine(self.engine_url)
        try:
            token = accounts.invite_patient(
                engine, chatbot_records.patient_id(patient_id), lifetime, now
            )
        finally:
            engine.dispose()
        return accounts.activation_link(self.auth, token)

    def live_refresh_tokens(
        self, patient: str, client: str = PORTAL_CLIENT, replaced: bool = False
    ) -> int:
        """``client``'s refresh tokens of ``patient``'s account that still work (neither
        revoked nor replaced by a newer one; with ``replaced``: those replaced by a refresh),
        read from the authorization server's tables."""
        engine = make_engine(self.engine_url)
        try:
            with Session(engine) as session:
                account = session.exec(
                    select(accounts.Account).where(
                        col(accounts.Account.patient) == chatbot_records.patient_id(patient)
                    )
                ).one()
                live = session.exec(
                    select(RefreshToken).where(
                        col(RefreshToken.account_id) == account.account_id,
                        col(RefreshToken.client_id) == client,
                        col(RefreshToken.revoked).is_(None),
                        col(RefreshToken.replaced).is_not(None)
                        if replaced
                        else col(RefreshToken.replaced).is_(None),
                    )
                ).all()
        finally:
            engine.dispose()
        return len(live)

    def system_headers(self) -> dict[str, str]:
        token = dev_tokens(self.stack.config.var).issue(
            "test-seed", parse_scopes("system/*.write system/*.read")
        )[0]
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospital]:
    if not list(CHAT_MODELS.glob("*.tar.gz")):
        pytest.fail(f"no trained chatbot model in {CHAT_MODELS} (scripts/bootstrap.sh trains it)")
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing (scripts/bootstrap.sh runs npm ci in services/portal)")
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    config = StackConfig(
        var=tmp_path_factory.mktemp("portal-stack"),
        ports=ports,
        chatbot=True,
        chat_models=CHAT_MODELS,
        only=("fhir-api", "chat-actions", "chat", "portal"),
        extra_env={"SCANWATCH_CHAT_RATE_BURST": "40"},
    )
    stack = Stack(config)
    clock = [0.0]
    test_port = free_port()
    test_secret = secrets.token_urlsafe(24)
    engine_url = f"sqlite:///{config.var / 'fhir.db'}"
    try:
        stack.start(timeout=300)
        hospital = Hospital(stack, engine_url, f"http://127.0.0.1:{test_port}", clock, test_secret)
        patients = chatbot_records.records() | {
            MAIN: chatbot_records.patient_records(
                MAIN, "Main^Pat", ((1, 14, 0.22), (3, 11, 0.41), (5, 20, 0.71))
            )
        }
        chatbot_records.seed(config.fhir_base, hospital.system_headers(), patients)
        engine = make_engine(engine_url)
        try:
            register_app(
                engine,
                TEST_CLIENT,
                [f"{hospital.test_portal}/callback"],
                confidential=True,
                secret=test_secret,
            )
        finally:
            engine.dispose()
        settings = Settings(
            port=test_port,
            fhir_base_url=config.fhir_base,
            chat_url=config.chat_url,
            client_id=TEST_CLIENT,
            client_secret=test_secret,
        )
        app = create_app(settings, clock=lambda: time.monotonic() + clock[0])
        with served(app, test_port):
            yield hospital
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**launch_options())
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def patients(hospital: Hospital, browser: Browser) -> dict[str, str]:
    """Alice's and Bob's accounts (username by PatientID), activated once for the tests that
    are not about activating."""
    names = {ALICE: "alice-b", BOB: "bob-b"}
    context = browser.new_context(viewport=DESKTOP)
    try:
        tab = context.new_page()
        for patient, username in names.items():
            activate(tab, hospital.invite(patient), username)
    finally:
        context.close()
    return names


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP, locale="en-GB")
    context.set_default_timeout(15_000)
    tab = context.new_page()
    yield tab
    context.close()


# --- Helpers -----------------------------------------------------------------------------------


def activate(page: Page, link: str, username: str) -> None:
    page.goto(link)
    page.get_by_label("Username").fill(username)
    page.get_by_label("New password", exact=True).fill(PASSWORD)
    page.get_by_label("New password again").fill(PASSWORD)
    page.get_by_role("button", name="Create my account").click()
    expect(page.get_by_text("Your account is ready")).to_be_visible()


def sign_in(page: Page, portal: str, username: str, password: str = PASSWORD) -> None:
    page.goto(f"{portal}/signin")
    page.get_by_role("link", name="Sign in").click()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()


def axe_check(page: Page, what: str) -> None:
    """axe-core from the local npm copy, evaluated in the page (the page's CSP allows no
    inline script, and DevTools evaluation is not one): no serious or critical violation."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length,"
        " target: v.nodes[0] && v.nodes[0].target}))"
    )
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not bad, f"axe-core on {what}: {bad}"


def screenshots(page: Page, name: str) -> None:
    """The page at desktop width, then loaded again at a phone's (as a phone would load it),
    where it must not scroll sideways; axe-core checks the phone layout too."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.reload()
    if page.locator("#progress-chart").count():
        expect(page.locator("#progress-chart")).to_have_attribute("data-drawn", "true")
    wide = page.evaluate("document.documentElement.scrollWidth")
    assert wide <= PHONE["width"], f"{name} scrolls sideways on a phone ({wide} px)"
    axe_check(page, f"{name} at a phone's width")
    page.screenshot(path=str(SHOTS / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)
    page.reload()


def chart_points(page: Page) -> str | None:
    return page.locator("#progress-chart").get_attribute("data-points")


def new_study(patient: str, month: int, day: int, p_normal: float) -> ScoredStudy:
    """A scored study as the worker builds it (``all_resources_for``: the Observation and
    everything beside it; ``registered_resources_for``: what is written before scoring)."""
    uid = f"2.25.{int.from_bytes(patient.encode()[-6:], 'big')}.{month}{day}"
    return chatbot_records._study(  # noqa: SLF001 - the records module's own builder
        patient, uid, datetime(2025, month, day, tzinfo=UTC), p_normal, "Main^Pat"
    )


def put(hospital: Hospital, resources: list[dict]) -> None:
    headers = {**hospital.system_headers(), "Content-Type": "application/fhir+json"}
    for resource in resources:
        url = f"{hospital.stack.config.fhir_base}/{resource['resourceType']}/{resource['id']}"
        httpx.put(url, json=resource, headers=headers, timeout=30).raise_for_status()


# --- The main path -----------------------------------------------------------------------------


def test_main_path(hospital: Hospital, page: Page, monkeypatch: pytest.MonkeyPatch) -> None:
    # The link `scanwatch patients invite PORTAL-MAIN --issuer HOSP` prints (this stack's API).
    monkeypatch.setenv("SCANWATCH_AUTH_ISSUER", hospital.auth)
    link = cli.invite_link(hospital.stack.config.var, MAIN, chatbot_records.ISSUER)
    activate(page, link, "main-patient")
    sign_in(page, hospital.portal, "main-patient")
    expect(page.get_by_role("heading", name="Your scan results")).to_be_visible()
    scans = page.get_by_role("list", name="Scans").get_by_role("listitem")
    expect(scans).to_have_count(3)
    expect(scans.first).to_contain_text("20 May 2025")
    expect(scans.first).to_contain_text("Preliminary AI result")
    reviewed = scans.filter(has_text="11 March 2025")
    expect(reviewed).to_contain_text("Reviewed by a clinician")
    expect(reviewed).to_contain_text("smaller than in January")
    canvas = page.locator("#progress-chart")
    expect(canvas).to_have_attribute("data-points", "3")  # one point per study
    page.get_by_text("Show the chart as a table").click()
    expect(page.locator("#progress-data tbody tr")).to_have_count(3)
    axe_check(page, "the results page")
    screenshots(page, "results")
    for thing in BOBS_FACTS:
        expect(page.locator("main")).not_to_contain_text(thing)

    # A study received and not scored yet shows as such, then its result replaces it, each
    # without a reload, within 2 s of being written.
    study = new_study(MAIN, 7, 1, 0.35)
    put(hospital, registered_resources_for(study))
    expect(scans).to_have_count(4, timeout=2_000)
    expect(scans.first).to_contain_text("Received, being analysed")
    put(hospital, all_resources_for(study))
    expect(scans.first).to_contain_text("Preliminary AI result", timeout=2_000)
    expect(scans).to_have_count(4)
    expect(scans.first).to_contain_text("1 July 2025")
    expect(canvas).to_have_attribute("data-points", "4")
    expect(page.get_by_role("status")).to_have_text("Your results have been updated.")

    # One result in detail.
    page.get_by_role("link", name="Details of the scan of 1 July 2025").click()
    expect(page.get_by_role("heading", name="Your scan of 1 July 2025")).to_be_visible()
    expect(page.locator("main")).to_contain_text("brain-mri-anomaly")
    expect(page.get_by_role("table", name="How likely each pattern is")).to_be_visible()
    expect(page.get_by_role("heading", name="What the numbers mean")).to_be_visible()
    axe_check(page, "a result's page")
    screenshots(page, "result")

    # The chat answers about that (the latest) result.
    page.get_by_role("link", name="Ask a question").first.click()
    page.get_by_label("Your message").fill("what did my last scan show?")
    page.get_by_role("button", name="Send").click()
    log = page.get_by_role("list", name="Conversation")
    expect(log).to_contain_text("Your scan of 1 July 2025", timeout=30_000)
    expect(log).to_contain_text("preliminary AI result")
    axe_check(page, "the chat page")
    screenshots(page, "chat")

    # Medicines and the next visit.
    page.get_by_role("link", name="Medicines and visits").click()
    expect(page.get_by_role("heading", name="Your medicines")).to_be_visible()
    expect(page.locator("main")).to_contain_text("Levetiracetam")
    expect(page.locator("main")).to_contain_text("Wednesday 15 January 2031 at 10:00")
    axe_check(page, "the medicines and visits page")
    screenshots(page, "care")

    # Sign out: the refresh token is revoked at the authorization server, the session ends
    # and the pages need a sign-in again.
    assert hospital.live_refresh_tokens(MAIN) == 1
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You have signed out")).to_be_visible()
    assert hospital.live_refresh_tokens(MAIN) == 0
    axe_check(page, "the sign-in page")
    screenshots(page, "signin")
    page.goto(f"{hospital.portal}/")
    expect(page.get_by_role("heading", name="Sign in to see your results")).to_be_visible()


# --- Isolation ----------------------------------------------------------------------------------


def test_a_patient_reaches_nothing_of_another_patients(
    hospital: Hospital, browser: Browser, patients: dict[str, str]
) -> None:
    contexts = [browser.new_context(viewport=DESKTOP) for _ in range(2)]
    try:
        alice, bob = (c.new_page() for c in contexts)
        for tab, patient in ((alice, ALICE), (bob, BOB)):
            sign_in(tab, hospital.portal, patients[patient])
            expect(tab.get_by_role("heading", name="Your scan results")).to_be_visible()
        records = chatbot_records.records()
        bobs_ids = {r["resourceType"]: r["id"] for r in records[BOB]}
        portal = hospital.portal
        tries = [
            f"/results/{bobs_ids['Observation']}",
            f"/results/{bobs_ids['DiagnosticReport']}",
            f"/results/{bobs_ids['ImagingStudy']}",
            f"/?patient={BOB_ID}",
            f"/?subject=Patient/{BOB_ID}",
            f"/results/fragment?patient={BOB_ID}",
            f"/care?patient={BOB_ID}",
            f"/chat?patient={BOB_ID}",
        ]
        for path in tries:
            alice.goto(portal + path)
            text = alice.locator("body").inner_text()
            assert not any(fact in text for fact in BOBS_FACTS), (path, text)
        expect(alice.get_by_role("heading", name="Result not found")).to_be_hidden()
        alice.goto(f"{portal}/results/{bobs_ids['Observation']}")
        expect(alice.get_by_role("heading", name="Result not found")).to_be_visible()
        # Bob sees his own result at that address.
        bob.goto(f"{portal}/results/{bobs_ids['Observation']}")
        expect(bob.get_by_role("heading", name="Your scan of 3 June 2025")).to_be_visible()
        # The chat answers Alice about Alice, whatever she names.
        alice.goto(f"{portal}/chat")
        alice.get_by_label("Your message").fill(f"show me the results of patient {BOB_ID}")
        alice.get_by_role("button", name="Send").click()
        log = alice.get_by_role("list", name="Conversation")
        expect(log).to_contain_text("only share information from your own records", timeout=30_000)
        # Bob's session id is his alone: Alice's browser never holds it, and the event stream
        # and the fragment answer only with the session's own patient.
        answer = alice.request.get(f"{portal}/results/fragment?patient={BOB_ID}")
        assert "3 June 2025" not in answer.text() and "20 May 2025" in answer.text()
    finally:
        for context in contexts:
            context.close()


# --- Bad inputs --------------------------------------------------------------------------------


def test_a_wrong_password_is_refused(hospital: Hospital, page: Page) -> None:
    activate(page, hospital.invite(CAROL), "carol")
    sign_in(page, hospital.portal, "carol", "not the password at all")
    expect(page.get_by_role("alert")).to_contain_text("That did not work")
    assert not page.url.startswith(hospital.portal)


def test_an_expired_or_reused_invite_does_not_work(hospital: Hospital, page: Page) -> None:
    expired = hospital.invite(BOB, timedelta(minutes=5), now=datetime.now(UTC) - timedelta(hours=1))
    page.goto(expired)
    expect(page.get_by_text("This activation link has expired or has been used")).to_be_visible()
    link = hospital.invite(DAVE)
    activate(page, link, "dave")
    page.goto(link)
    expect(page.get_by_text("This activation link has expired or has been used")).to_be_visible()


def test_a_tampered_state_gets_a_clear_error(
    hospital: Hospital, page: Page, patients: dict[str, str]
) -> None:
    """The sign-in the portal started, sent to the authorization server with another
    ``state`` than the one it made (as a forged link would): the patient signs in, comes back,
    and the portal refuses with a clear page instead of starting a session."""
    start = page.request.get(f"{hospital.portal}/login", max_redirects=0)  # the browser's cookies
    parts = urlsplit(start.headers["location"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["state"] += "tampered"
    page.goto(f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query)}")
    page.get_by_label("Username").fill(patients[ALICE])
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("This sign-in link is not valid")
    assert page.url.startswith(f"{hospital.portal}/callback")
    axe_check(page, "the sign-in error page")
    page.goto(f"{hospital.portal}/")
    expect(page.get_by_role("heading", name="Sign in to see your results")).to_be_visible()


def test_a_wrong_pkce_verifier_is_refused(
    hospital: Hospital, page: Page, patients: dict[str, str]
) -> None:
    """The code the patient's sign-in produced, exchanged with another verifier than the one
    its challenge was made from: refused, no token."""
    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect = f"{hospital.test_portal}/callback"
    query = {
        "response_type": "code",
        "client_id": TEST_CLIENT,
        "redirect_uri": redirect,
        "scope": "launch/patient openid patient/*.read",
        "state": "s" * 20,
        "aud": hospital.stack.config.fhir_base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    page.goto(f"{hospital.auth}/auth/authorize?{urlencode(query)}")
    page.get_by_label("Username").fill(patients[ALICE])
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    # Back at the portal's callback, which refuses it (no sign-in of its own is pending in
    # this browser) without spending the code: the code is in the address.
    expect(page.get_by_role("alert")).to_contain_text("This sign-in link is not valid")
    code = parse_qs(urlsplit(page.url).query)["code"][0]
    token_url = f"{hospital.auth}/auth/token"
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}
    auth = (TEST_CLIENT, hospital.test_secret)
    wrong = httpx.post(token_url, data={**form, "code_verifier": "x" * 50}, auth=auth)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert "access_token" not in wrong.text


def test_the_keyboard_alone(hospital: Hospital, page: Page, patients: dict[str, str]) -> None:
    """Signed in, a patient who uses only the keyboard skips to the content, reaches the chat,
    asks and reads the answer, and signs out."""
    sign_in(page, hospital.portal, patients[BOB])
    expect(page.get_by_role("heading", name="Your scan results")).to_be_visible()

    def tab_to(name: str, role: str = "link") -> None:
        target = page.get_by_role(role, name=name)  # type: ignore[arg-type]
        for _ in range(40):
            page.keyboard.press("Tab")
            if target.evaluate("element => element === document.activeElement"):
                return
        raise AssertionError(f"Tab never reaches {role} {name!r}")

    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to main content")).to_be_focused()
    tab_to("Ask a question")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Ask a question")).to_be_visible()
    tab_to("Your message", "textbox")
    page.keyboard.type("when is my next appointment")
    page.keyboard.press("Enter")
    log = page.get_by_role("list", name="Conversation")
    expect(log).to_contain_text("20 January 2031", timeout=30_000)
    expect(page.get_by_label("Your message")).to_be_focused()  # ready for the next question
    tab_to("Sign out", "button")
    page.keyboard.press("Enter")
    expect(page.get_by_text("You have signed out")).to_be_visible()


def test_tokens_are_refreshed_then_an_idle_session_asks_to_sign_in_again(
    hospital: Hospital, page: Page, patients: dict[str, str]
) -> None:
    sign_in(page, hospital.test_portal, patients[ALICE])
    expect(page.get_by_role("heading", name="Your scan results")).to_be_visible()
    # 14 minutes 40 s on, the access token (15 minutes) is due: the portal refreshes it at the
    # authorization server (which replaces the refresh token) and the patient notices nothing.
    replaced = hospital.live_refresh_tokens(ALICE, TEST_CLIENT, replaced=True)
    hospital.clock[0] += 880
    page.get_by_role("link", name="Medicines and visits").click()
    expect(page.get_by_role("heading", name="Your medicines")).to_be_visible()
    assert hospital.live_refresh_tokens(ALICE, TEST_CLIENT, replaced=True) == replaced + 1
    assert hospital.live_refresh_tokens(ALICE, TEST_CLIENT) == 1
    hospital.clock[0] += 1801  # past the idle limit (30 minutes)
    page.get_by_role("link", name="Medicines and visits").click()
    expect(page.get_by_role("status")).to_contain_text("Your session has ended")
    expect(page.get_by_role("heading", name="Sign in to see your results")).to_be_visible()
    axe_check(page, "the session-ended page")
    screenshots(page, "session-ended")
