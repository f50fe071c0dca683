"""The portal's routes against a fake hospital (``fakes.py``): signing in (state, PKCE,
verified token), the pages, isolation between patients, CSRF, chat forwarding, token refresh,
session expiry and sign-out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from devtools import chatbot_records
from devtools.testing import logged
from services.auth.scopes import parse_scopes
from services.auth.tokens import TokenService, load_key_set
from services.auth.web_security import CONTENT_SECURITY_POLICY
from services.portal.app import create_app
from services.portal.fhir import PatientFhir
from services.portal.tests.fakes import ALICE, BOB, FHIR, FakeHospital, settings

BASE = "http://127.0.0.1:8090"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hospital(signing_keys: Path) -> FakeHospital:
    return FakeHospital(signing_keys)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(hospital: FakeHospital, clock: Clock) -> Iterator[TestClient]:
    app = create_app(
        settings(), transport=hospital.transport(), verifier=hospital.verify, clock=clock
    )
    with TestClient(app, base_url=BASE, follow_redirects=False) as test_client:
        yield test_client


def sign_in(client: TestClient, hospital: FakeHospital, patient: str = ALICE) -> None:
    start = client.get("/login")
    assert start.status_code == 303
    code, state = hospital.authorize(start.headers["location"], patient)
    back = client.get("/callback", params={"code": code, "state": state})
    assert back.status_code == 303, back.text
    assert back.headers["location"] == "/"


def csrf(client: TestClient, path: str = "/") -> str:
    html = client.get(path).text
    marker = 'name="csrf-token" content="'
    return html.split(marker, 1)[1].split('"', 1)[0]


def observation_ids(patient: str) -> list[str]:
    """The ids of a patient's AI results (Observations) in the fake's records."""
    records = {chatbot_records.patient_id(p): rs for p, rs in chatbot_records.records().items()}
    return [r["id"] for r in records[patient] if r["resourceType"] == "Observation"]


def test_pages_need_a_signed_in_patient(client: TestClient) -> None:
    for path in (
        "/",
        "/care",
        "/chat",
        "/results/fragment",
        f"/results/{observation_ids(ALICE)[0]}",
    ):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/signin", path
    assert client.get("/events", headers={"Accept": "text/event-stream"}).status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}


def test_sign_in_with_pkce_then_the_results_list(
    client: TestClient, hospital: FakeHospital
) -> None:
    start = client.get("/login")
    cookie = start.headers["set-cookie"]
    assert "scanwatch_portal_session=" in cookie
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    assert "Secure" not in cookie  # loopback over http: development
    before = client.cookies.get("scanwatch_portal_session")
    sign_in(client, hospital)
    # The session id changes at sign-in (fixation), and the code was exchanged with a verifier.
    assert client.cookies.get("scanwatch_portal_session") != before
    grant = hospital.token_requests[-1]
    assert grant["grant_type"] == "authorization_code" and len(grant["code_verifier"]) >= 43
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    listed = html[html.index('id="results-heading"') :]
    assert (
        listed.index("20 May 2025")
        < listed.index("11 March 2025")
        < listed.index("14 January 2025")
    )
    assert "Preliminary AI result" in html and "Reviewed by a clinician" in html
    assert "smaller than in January" in html and "Dr. Rivera" in html
    assert "did not flag anything unusual" in html and "flagged it for a closer look" in html
    assert html.count('<tr data-when="') == 3  # one chart point per study
    assert "3 June 2025" not in html  # Bob's study
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in html and "<script src=" in html


def test_the_session_cookie_is_secure_with_the_host_prefix_off_loopback(
    hospital: FakeHospital,
) -> None:
    app = create_app(
        settings(public_url="https://portal.example", host="0.0.0.0"),
        transport=hospital.transport(),
        verifier=hospital.verify,
    )
    with TestClient(app, base_url="https://portal.example", follow_redirects=False) as client:
        cookie = client.get("/login").headers["set-cookie"]
        assert cookie.startswith("__Host-scanwatch_portal_session=")
        assert "Secure" in cookie and "HttpOnly" in cookie
        assert "strict-transport-security" in client.get("/healthz").headers


def test_a_tampered_state_gets_a_clear_error(client: TestClient, hospital: FakeHospital) -> None:
    start = client.get("/login")
    code, state = hospital.authorize(start.headers["location"], ALICE)
    answer = client.get("/callback", params={"code": code, "state": state + "x"})
    assert answer.status_code == 400
    assert "This sign-in link is not valid" in answer.text
    assert not hospital.token_requests  # the code was never spent
    # Without any sign-in started in this browser (a link from elsewhere): the same.
    client.cookies.clear()
    assert client.get("/callback", params={"code": code, "state": state}).status_code == 400


def test_signing_in_again_needs_a_sign_out_first(
    client: TestClient, hospital: FakeHospital
) -> None:
    """On a shared computer the next patient cannot sign in over the previous one's session
    (and see their chat transcript): /login while signed in goes back to the results."""
    sign_in(client, hospital, ALICE)
    again = client.get("/login")
    assert again.status_code == 303 and again.headers["location"] == "/"
    assert len(hospital.codes) == 0 and len(hospital.token_requests) == 1


def test_a_state_is_good_once(client: TestClient, hospital: FakeHospital) -> None:
    start = client.get("/login")
    code, state = hospital.authorize(start.headers["location"], ALICE)
    assert client.get("/callback", params={"code": code, "state": state}).status_code == 303
    again = client.get("/callback", params={"code": code, "state": state})
    assert again.status_code == 400


def test_a_refused_code_exchange_is_an_error_page(
    client: TestClient, hospital: FakeHospital
) -> None:
    start = client.get("/login")
    _code, state = hospital.authorize(start.headers["location"], ALICE)
    answer = client.get("/callback", params={"code": "not-a-code", "state": state})
    assert answer.status_code == 400 and "could not be completed" in answer.text
    assert client.get("/").headers["location"] == "/signin"


def test_a_denied_sign_in_says_so(client: TestClient, hospital: FakeHospital) -> None:
    start = client.get("/login")
    _code, state = hospital.authorize(start.headers["location"], ALICE)
    answer = client.get("/callback", params={"error": "access_denied", "state": state})
    assert answer.status_code == 400 and "You cancelled the sign-in" in answer.text


def test_another_patients_identifiers_reach_nothing(
    client: TestClient, hospital: FakeHospital
) -> None:
    sign_in(client, hospital, ALICE)
    bobs = observation_ids(BOB)[0]
    answer = client.get(f"/results/{bobs}")
    assert answer.status_code == 404 and "Result not found" in answer.text
    assert "3 June 2025" not in answer.text
    for path in ("/", "/care", "/results/fragment"):
        html = client.get(path, params={"patient": BOB, "subject": f"Patient/{BOB}"}).text
        assert "3 June 2025" not in html and "Dexamethasone" not in html
    # Every FHIR call the portal made named Alice (her token's patient) and no one else.
    assert all(BOB not in url for url in hospital.fhir_calls)
    for bad in ("..%2FPatient%2F" + BOB, "x" * 65, "a b"):
        assert client.get(f"/results/{bad}").status_code == 404


def test_one_result_in_detail(client: TestClient, hospital: FakeHospital) -> None:
    sign_in(client, hospital)
    for oid in observation_ids(ALICE):
        html = client.get(f"/results/{oid}").text
        assert "brain-mri-anomaly" in html and "version <strong>1</strong>" in html
        assert "between 0 and 1" in html and "not a diagnosis" in html
        assert "%" in html


def test_medicines_and_the_next_visit(client: TestClient, hospital: FakeHospital) -> None:
    sign_in(client, hospital)
    html = client.get("/care").text
    assert "Levetiracetam 500 mg oral tablet" in html and "Paracetamol" not in html
    assert "Wednesday 15 January 2031 at 10:00" in html
    assert "Neuro-oncology clinic" in html


def test_chat_goes_to_the_chatbot_with_the_patients_token(
    client: TestClient, hospital: FakeHospital
) -> None:
    sign_in(client, hospital)
    token = csrf(client, "/chat")
    answer = client.post(
        "/chat",
        data={"message": "what did my last scan show?"},
        headers={"X-CSRF-Token": token, "Accept": "application/json"},
    )
    assert answer.status_code == 200
    lines = answer.json()
    assert lines[0] == {"speaker": "you", "text": "what did my last scan show?", "buttons": []}
    assert lines[1]["text"] == f"You said <what did my last scan show?> as {ALICE}"
    assert hospital.chat_seen == [(ALICE, "what did my last scan show?")]
    # Without JavaScript: a form post, then the chat page shows the transcript, escaped.
    posted = client.post("/chat", data={"message": "call me", "csrf_token": token})
    assert posted.status_code == 303
    html = client.get("/chat").text
    assert "You said &lt;what did my last scan show?&gt;" in html
    assert 'value="/affirm"' in html and "Yes, please call me" in html
    # A button's payload goes as the payload; the transcript shows the button's title.
    client.post("/chat", data={"payload": "/affirm", "csrf_token": token})
    assert hospital.chat_seen[-1] == (ALICE, "/affirm")


def test_forms_without_the_csrf_token_are_refused(
    client: TestClient, hospital: FakeHospital
) -> None:
    sign_in(client, hospital)
    assert client.post("/chat", data={"message": "hi"}).status_code == 403
    assert client.post("/chat", data={"message": "hi", "csrf_token": "forged"}).status_code == 403
    assert client.post("/signout", data={"csrf_token": "forged"}).status_code == 403
    assert not hospital.chat_seen
    assert client.get("/").status_code == 200  # still signed in


def test_an_expired_access_token_is_refreshed(
    client: TestClient, hospital: FakeHospital, clock: Clock
) -> None:
    hospital.lifetime_s = 120
    sign_in(client, hospital)
    clock.now += 100  # within the refresh margin of its expiry
    assert client.get("/").status_code == 200
    assert hospital.token_requests[-1]["grant_type"] == "refresh_token"
    refreshes = len(hospital.token_requests)
    assert client.get("/care").status_code == 200
    assert len(hospital.token_requests) == refreshes  # the new token is used, not refreshed again


def test_a_refused_refresh_ends_the_session_with_a_message(
    client: TestClient, hospital: FakeHospital, clock: Clock
) -> None:
    hospital.lifetime_s = 60
    sign_in(client, hospital)
    hospital.refresh_tokens.clear()  # revoked elsewhere
    clock.now += 61
    answer = client.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "/signin?reason=expired"
    assert "Your session has ended" in client.get("/signin?reason=expired").text


def test_a_token_the_fhir_api_refuses_ends_the_session_and_the_log_says_so(
    client: TestClient, hospital: FakeHospital, tmp_path: Path
) -> None:
    sign_in(client, hospital)
    hospital.tokens = TokenService(load_key_set(tmp_path / "other-keys.json"))  # keys rotated
    with logged("services.portal.routes") as records:
        answer = client.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "/signin?reason=expired"
    assert [r.getMessage() for r in records if r.levelno == logging.WARNING] == [
        "session ended: the FHIR API refused its access token"
    ]


def test_an_idle_session_ends_with_a_message(
    client: TestClient, hospital: FakeHospital, clock: Clock
) -> None:
    sign_in(client, hospital)
    clock.now += 1801
    answer = client.get("/care")
    assert answer.headers["location"] == "/signin?reason=expired"
    assert "Your session has ended" in client.get("/signin?reason=expired").text


def test_an_ended_sessions_cookie_alone_says_why(
    client: TestClient, hospital: FakeHospital, clock: Clock
) -> None:
    """A patient who comes back to the sign-in page (no reason in the URL) with the cookie of
    a session that has ended is told why they must sign in again."""
    sign_in(client, hospital)
    clock.now += 43201  # past the longest session
    answer = client.get("/signin")
    assert answer.status_code == 200 and "Your session has ended" in answer.text


def test_sign_out_revokes_the_refresh_token(client: TestClient, hospital: FakeHospital) -> None:
    sign_in(client, hospital)
    refresh = next(iter(hospital.refresh_tokens))
    token = csrf(client)
    answer = client.post("/signout", data={"csrf_token": token})
    assert answer.status_code == 303 and answer.headers["location"] == "/signin?reason=signed-out"
    assert hospital.revoked == [refresh]
    assert client.get("/").headers["location"] == "/signin"
    assert "You have signed out" in client.get("/signin?reason=signed-out").text


def test_the_chart_library_is_served_by_the_portal(client: TestClient) -> None:
    answer = client.get("/static/vendor/chart.umd.min.js")
    assert answer.status_code == 200, "npm ci in services/portal (scripts/bootstrap.sh)"
    assert "Chart" in answer.text[:5000]
    assert client.get("/static/vendor/package.json").status_code == 404
    script = client.get("/static/portal.js")
    assert script.status_code == 200 and script.headers["cache-control"] == "public, max-age=3600"
    assert "content-security-policy" in script.headers


def test_the_event_stream_polls_fhir_with_the_patients_own_token(
    hospital: FakeHospital, signing_keys: Path
) -> None:
    """What the stream asks FHIR: the patient's own results, studies and reports written after
    the page's newest ``meta.lastUpdated``; a newer one is what makes the page refresh."""
    stamped = "2026-12-04T10:00:00Z"
    for resource in hospital.records[ALICE]:
        resource["meta"] = {**resource.get("meta", {}), "lastUpdated": stamped}
    token = hospital.tokens.issue("p", parse_scopes("patient/*.read"), ALICE)[0]

    async def poll(since: str | None) -> str | None:
        async with httpx.AsyncClient(transport=hospital.transport()) as http:
            return await PatientFhir(http, FHIR, token, ALICE).updated_since(since)

    assert asyncio.run(poll(None)) == stamped
    assert asyncio.run(poll(stamped)) is None
    calls = hospital.fhir_calls[-3:]
    assert all(f"patient={ALICE}" in c and "_lastUpdated=gt" in c for c in calls)
    assert {c.split("?")[0].rsplit("/", 1)[1] for c in calls} == {
        "Observation",
        "ImagingStudy",
        "DiagnosticReport",
    }


@pytest.mark.parametrize(
    ("answers", "expected", "calls"),
    [
        # Busy for a moment, then fine: the patient sees the page.
        ([(503, {"Retry-After": "0"}), (200, {})], 200, 2),
        # Busy twice: asked once more only, then the patient is told to come back.
        ([(503, {"Retry-After": "0"}), (503, {"Retry-After": "0"})], 503, 2),
        # Busy for longer than a page may wait, or without saying how long: not asked again.
        ([(503, {"Retry-After": "30"})], 503, 1),
        ([(503, {})], 503, 1),
        ([(500, {})], 500, 1),
    ],
)
def test_a_busy_fhir_api_is_asked_once_more_when_it_says_so(
    answers: list[tuple[int, dict[str, str]]], expected: int, calls: int
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        status, headers = answers[len(seen)]
        seen.append(request)
        return httpx.Response(status, headers=headers, json={"resourceType": "Bundle"})

    async def read() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await PatientFhir(http, FHIR, "token", ALICE)._get(f"{FHIR}/Observation")

    assert asyncio.run(read()).status_code == expected
    assert len(seen) == calls
    assert all(r.headers["Authorization"] == "Bearer token" for r in seen)
