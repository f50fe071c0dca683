"""The console's staff pages in a real browser (Debian's Chromium via Playwright) against the
real authorization server (the FHIR API's app, SQLite) and the console app, both served over
HTTP: each role signs in with password and TOTP at the authorization server and lands on its
page; the role checks (an operator cannot reach a clinician-only page or API, an admin no
worklist, a patient's sign-in and a patient's token open nothing); bad inputs (wrong password,
a tampered state); sign-out; every action an AuditEvent naming the staff member; axe-core."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pyotp
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from playwright.sync_api import Page, expect
from pydicom.data import get_testdata_file
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from devtools.browser import form_fields
from devtools.kafka_local import free_port
from devtools.testing import served
from dicom_listener.adapters.filestore import FileStore
from inference_worker.fhir_resources import resources_for
from scanwatch import ids
from services.auth import accounts, clients
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.console.app import create_app as create_console
from services.console.config import Settings as ConsoleSettings
from services.console.tests.helpers import put, relabelled
from services.fhir_api.app import create_app as create_fhir
from services.fhir_api.config import Settings as FhirSettings
from services.fhir_api.tests.test_search import scored

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
AXE = ROOT / "services" / "portal" / "node_modules" / "axe-core" / "axe.min.js"
PASSWORD = "correct horse battery staple"
CONSOLE_CLIENT = "test-console"
STUDY = "1.2.826.0.1.3680043.8.498.1"


@dataclass
class Hospital:
    fhir: str  # the FHIR API's base URL (its authorization server at its root)
    console: str
    engine: Engine
    tokens: TokenService
    web: Any  # the console's services.console.web.Web
    totp: dict[str, str]  # username → TOTP secret
    store: Path  # the listener's file store the console reads

    def system_headers(self) -> dict[str, str]:
        token, _ = self.tokens.issue("pipeline", [Scope.parse("system/*.write")])
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}

    def code(self, username: str) -> str:
        """The next step's TOTP code: activation spent the current one, and a code works
        once, so each account signs in once (each test has its own)."""
        return pyotp.TOTP(self.totp[username]).at(datetime.now(UTC), counter_offset=1)


def activate(base: str, engine: Engine, username: str, role: str) -> str:
    """Create the staff account and activate it over HTTP; its TOTP secret."""
    token = accounts.create_staff(engine, username, role)
    with httpx.Client(base_url=base) as browser:
        fields = form_fields(browser.get(f"/auth/activate?{urlencode({'token': token})}").text)
        fields.update(password=PASSWORD, password2=PASSWORD)
        fields["totp"] = pyotp.TOTP(fields["totp_secret"]).now()
        done = browser.post("/auth/activate", data=fields)
        assert done.status_code == 200 and "Your account is ready" in done.text, done.text
    return fields["totp_secret"]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospital]:
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing (scripts/bootstrap.sh runs npm ci in services/portal)")
    var = tmp_path_factory.mktemp("console-web")
    fhir_settings = FhirSettings(
        database_url=f"sqlite:///{var / 'fhir.db'}",
        auth_mode="required",
        signing_keys_file=var / "keys.json",
    )
    fhir_app = create_fhir(fhir_settings)
    fhir_port, console_port = free_port(), free_port()
    with served(fhir_app, fhir_port):
        base = f"http://127.0.0.1:{fhir_port}"
        engine = fhir_app.state.store.engine
        console_url = f"http://127.0.0.1:{console_port}"
        secret = clients.register_staff_app(
            engine, CONSOLE_CLIENT, [f"{console_url}/callback"], description="Staff console"
        )
        totp = {
            "dr.ada": activate(base, engine, "dr.ada", "clinician"),
            "ops.bob": activate(base, engine, "ops.bob", "operator"),
            "adm.cy": activate(base, engine, "adm.cy", "admin"),
            "dr.eve": activate(base, engine, "dr.eve", "clinician"),
            "dr.fay": activate(base, engine, "dr.fay", "clinician"),
        }
        patient = ids.patient_id("HOSP", "PAT-1")
        invite = accounts.invite_patient(engine, patient)
        with httpx.Client(base_url=base) as browser:
            fields = form_fields(browser.get(f"/auth/activate?token={invite}").text)
            fields.update(username="pat.one", password=PASSWORD, password2=PASSWORD, totp="")
            assert browser.post("/auth/activate", data=fields).status_code == 200
        (var / "store").mkdir()
        settings = ConsoleSettings(
            port=console_port,
            storage_dir=var / "store",
            index_url=f"sqlite:///{var / 'index.db'}",
            audit_url=f"sqlite:///{var / 'audit.db'}",
            jwks_url=f"{base}/auth/jwks",
            fhir_base_url=f"{base}/fhir",
            client_id=CONSOLE_CLIENT,
            client_secret=secret,
        )
        console_app = create_console(settings)
        with served(console_app, console_port):
            yield Hospital(
                f"{base}/fhir",
                console_url,
                engine,
                TokenService(load_key_set(var / "keys.json")),
                console_app.state.web,
                totp,
                var / "store",
            )


def sign_in(page: Page, hospital: Hospital, username: str, password: str = PASSWORD) -> None:
    page.goto(f"{hospital.console}/signin")
    page.get_by_role("link", name="Sign in").click()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    if username in hospital.totp:
        page.get_by_label("Code from your authenticator app").fill(hospital.code(username))
    page.get_by_role("button", name="Sign in").click()


def axe_check(page: Page, what: str) -> None:
    """axe-core from the portal's npm copy, evaluated in the page: no serious or critical
    violation."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length}))"
    )
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not bad, f"axe-core on {what}: {bad}"


def audit_of(hospital: Hospital, username: str) -> list[dict[str, Any]]:
    with Session(hospital.engine) as session:
        account = session.exec(
            select(accounts.Account).where(col(accounts.Account.username) == username)
        ).one()
    events: list[dict[str, Any]] = hospital.web.trail.events(account.account_id)
    for event in events:
        AuditEvent.model_validate(event)  # a valid FHIR R4 AuditEvent
    return events


def test_clinician_signs_in_and_reaches_clinical_pages(hospital: Hospital, page: Page) -> None:
    sign_in(page, hospital, "dr.ada")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    expect(page.get_by_text("Signed in: clinician")).to_be_visible()
    response = page.goto(f"{hospital.console}/studies/{STUDY}")
    assert response is not None and response.status == 200
    expect(page.get_by_text(STUDY)).to_be_visible()
    axe_check(page, "the study page")
    api = page.request.get(f"{hospital.console}/api/studies/{STUDY}")
    assert api.status == 200 and api.json()["StudyInstanceUID"] == STUDY
    # The admin page is not a clinician's.
    refused = page.goto(f"{hospital.console}/admin")
    assert refused is not None and refused.status == 403
    expect(page.get_by_role("heading", name="Not for your role")).to_be_visible()
    page.goto(f"{hospital.console}/worklist")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You have signed out.")).to_be_visible()
    axe_check(page, "the sign-in page")
    after = page.goto(f"{hospital.console}/worklist")
    assert after is not None and page.url.startswith(f"{hospital.console}/signin")
    events = audit_of(hospital, "dr.ada")
    kinds = [
        (e["type"]["code"], e.get("subtype", [{}])[0].get("code"), e["outcome"]) for e in events
    ]
    assert kinds[0] == ("110114", "110122", "0")  # login
    assert ("110103", None, "0") in kinds  # the study opened
    assert ("110113", None, "4") in kinds  # the refused admin page
    assert kinds[-1] == ("110114", "110123", "0")  # logout
    opened = next(e for e in events if e["type"]["code"] == "110103")
    assert opened["agent"][0]["who"]["reference"].startswith("Practitioner/")
    assert opened["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{STUDY}"


def test_operator_cannot_reach_clinician_only_pages(hospital: Hospital, page: Page) -> None:
    sign_in(page, hospital, "ops.bob")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    page_answer = page.goto(f"{hospital.console}/studies/{STUDY}")
    assert page_answer is not None and page_answer.status == 403
    api = page.request.get(f"{hospital.console}/api/studies/{STUDY}")
    assert api.status == 403
    events = audit_of(hospital, "ops.bob")
    assert any(e["outcome"] == "4" for e in events)
    assert all("reference" not in e["agent"][0]["who"] for e in events)  # no Practitioner


def test_admin_lands_on_accounts(hospital: Hospital, page: Page) -> None:
    sign_in(page, hospital, "adm.cy")
    expect(page).to_have_url(f"{hospital.console}/admin")
    expect(page.get_by_role("heading", name="Staff accounts")).to_be_visible()
    axe_check(page, "the admin page")
    refused = page.goto(f"{hospital.console}/worklist")
    assert refused is not None and refused.status == 403


def test_patients_get_nothing(hospital: Hospital, page: Page) -> None:
    # A patient's sign-in at the console is refused by the authorization server.
    sign_in(page, hospital, "pat.one")
    expect(page.get_by_text("This account cannot sign in to Staff console")).to_be_visible()
    # A patient's bearer token opens no console page, API or DICOMweb.
    token, _ = hospital.tokens.issue(
        "portal", [Scope.parse("patient/*.read")], ids.patient_id("HOSP", "PAT-1")
    )
    bearer = {"Authorization": f"Bearer {token}"}
    for path in ("/worklist", f"/api/studies/{STUDY}", "/admin"):
        answer = httpx.get(f"{hospital.console}{path}", headers=bearer)
        assert answer.status_code in (303, 401), (path, answer.status_code)
    assert httpx.get(f"{hospital.console}/dicomweb/studies", headers=bearer).status_code == 403


def test_bad_inputs(hospital: Hospital, page: Page) -> None:
    sign_in(page, hospital, "dr.eve", PASSWORD + "x")
    expect(page.get_by_role("alert")).to_contain_text("That did not work")
    # A callback whose state this browser's sign-in did not send.
    page.goto(f"{hospital.console}/login")  # starts a sign-in (the state is kept server-side)
    answer = page.goto(f"{hospital.console}/callback?code=abc&state=tampered")
    assert answer is not None and answer.status == 400
    expect(page.get_by_role("alert")).to_contain_text("This sign-in link is not valid")
    # A sign-out form without the session's CSRF token.
    sign_in(page, hospital, "dr.eve")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    forged = page.request.post(f"{hospital.console}/signout", form={"csrf_token": "forged"})
    assert forged.status == 403
    still = page.goto(f"{hospital.console}/worklist")
    assert still is not None and still.status == 200
    # The pages run no inline script and load nothing from elsewhere.
    csp = still.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    cookie = next(c for c in page.context.cookies() if c["name"] == "scanwatch_console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert json.dumps(cookie).count(cookie["value"]) == 1


# --- the worklist --------------------------------------------------------------------------

MR = Path(get_testdata_file("MR_small.dcm"))
SHOTS = ROOT / "var" / "screenshots" / "console"


def store_study(hospital: Hospital, tmp: Path, uid: str, name: str, day: str, n: int = 2) -> None:
    """``n`` instances of one study in the file store, stored as the listener stores them."""
    store = FileStore(hospital.store)
    series = f"{uid}.1"
    for i in range(n):
        source = relabelled(
            MR,
            tmp / f"{uid}-{i}.dcm",
            StudyInstanceUID=uid,
            SeriesInstanceUID=series,
            SOPInstanceUID=f"{uid}.1.{i + 1}",
            PatientName=name,
            PatientID=f"PID-{uid[-3:]}",
            StudyDate=day,
            StudyTime="083000",
            StudyDescription="MR brain",
        )
        put(store, source)


def score(hospital: Hospital, uid: str, p_normal: float, status: str | None = None) -> None:
    """The pipeline's FHIR results of a scored study (as the worker writes them)."""
    study = scored(uid, f"PID-{uid[-3:]}", p_normal=p_normal)
    for resource in resources_for(study):
        if status and resource["resourceType"] == "Observation":
            resource["status"] = status
        answer = httpx.put(
            f"{hospital.fhir}/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers=hospital.system_headers(),
        )
        assert answer.status_code in (200, 201), answer.text


def study_order(page: Page) -> list[str]:
    return page.locator("table.worklist tbody tr[data-study]").evaluate_all(
        "rows => rows.map(r => r.dataset.study)"
    )


def test_worklist_in_triage_order_with_filters_and_live_updates(
    hospital: Hospital, page: Page, tmp_path: Path
) -> None:
    base = "1.2.826.0.1.3680043.8.498.77"
    high, mid, normal, waiting, late, failed = (
        f"{base}.{n}" for n in (101, 102, 103, 104, 105, 106)
    )
    store_study(hospital, tmp_path, high, "High^Alice", "20250303")
    store_study(hospital, tmp_path, mid, "Mid^Bob", "20250301")
    store_study(hospital, tmp_path, normal, "Normal^Carol", "20250302", n=3)
    markup = "<script>alert(1)</script><b>Evil</b>^Eve"
    store_study(hospital, tmp_path, waiting, markup, "20250228")
    store_study(hospital, tmp_path, failed, "Failed^Fred", "20250305")
    # As the dead-letter reader stores it (its Kafka side: test_dead_letters.py).
    hospital.web.worklist.map_new_studies()
    hospital.web.worklist.store_failure(
        failed, "dicom.study.ready.v1", "no usable series <i>axial</i>", "unusable"
    )
    score(hospital, high, p_normal=0.05)
    score(hospital, mid, p_normal=0.3)
    score(hospital, normal, p_normal=0.9, status="final")  # reviewed by a clinician
    sign_in(page, hospital, "dr.fay")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    expect(page.locator(f"tr[data-study='{high}']")).to_be_visible()
    # Abnormal first by score; then the longest waiting (the oldest study) first.
    assert study_order(page) == [high, mid, waiting, normal, failed]
    expect(page.locator(f"tr[data-study='{failed}']")).to_contain_text(
        "Failed: no usable series <i>axial</i>"
    )
    first = page.locator(f"tr[data-study='{high}']")
    expect(first).to_contain_text("AI abnormal")
    expect(first.get_by_role("link", name="High Alice")).to_have_attribute(
        "href", f"/studies/{high}"
    )
    # The DICOM PatientName's markup is shown as text, never run or rendered.
    evil = page.locator(f"tr[data-study='{waiting}']")
    expect(evil).to_contain_text("<script>alert(1)</script><b>Evil</b> Eve")
    assert evil.locator("script, b").count() == 0
    expect(evil).to_contain_text("Awaiting score")
    axe_check(page, "the worklist")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "worklist.png"), full_page=True)
    # Filters, by their labels.
    page.get_by_label("AI interpretation").select_option("A")
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator(f"tr[data-study='{normal}']")).to_have_count(0)
    assert study_order(page) == [high, mid]
    page.goto(f"{hospital.console}/worklist?reviewed=yes")
    assert study_order(page) == [normal]
    page.goto(f"{hospital.console}/worklist?status=awaiting")
    assert study_order(page) == [waiting]
    page.goto(f"{hospital.console}/worklist?status=failed")
    assert study_order(page) == [failed]
    page.goto(f"{hospital.console}/worklist?from=2025-03-02&to=2025-03-03")
    assert set(study_order(page)) == {high, normal}
    page.goto(f"{hospital.console}/worklist?model=m+v1&reviewed=no")
    assert study_order(page) == [high, mid]
    bad = page.goto(f"{hospital.console}/worklist?from=yesterday")
    assert bad is not None and bad.status == 400
    expect(page.get_by_role("alert")).to_contain_text("is not a date")
    # Live: a study stored, then scored abnormal, appears at the top without a reload.
    page.goto(f"{hospital.console}/worklist")
    expect(page.locator(f"tr[data-study='{high}']")).to_be_visible()
    store_study(hospital, tmp_path, late, "Late^Dan", "20250304")
    expect(page.locator(f"tr[data-study='{late}']")).to_contain_text("Awaiting score")
    score(hospital, late, p_normal=0.01)
    expect(page.locator(f"tr[data-study='{late}']")).to_contain_text("AI abnormal")
    assert study_order(page)[0] == late
