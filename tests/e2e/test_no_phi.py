"""No PHI in logs or metrics (DESIGN §2, issue 19 point 5), on the whole stack that
``scanwatch run`` starts: Kafka, the listener, the worker, the model server with the shipped
model, the FHIR API and its authorization server, the portal, the console and the chatbot.

A study whose patient has a distinctive name, birth date and PatientID is sent with dcmtk's
storescu and scored; an EHR reads and searches FHIR (by name, birth date and identifier too:
queries that carry PHI in their URL); a staff member searches DICOMweb by name and opens the
study in the console's worklist and viewer; the patient signs in to the portal and tells the
chatbot their name and birth date. Then every service log under the stack's logs folder and
every ``/metrics`` answer is searched, case-insensitively, for each part of the name, every
rendering of the birth date and the PatientID: none may appear.

The FHIR Patient id (``scanwatch.ids.patient_id``, a UUIDv5 of IssuerOfPatientID and
PatientID) is a pseudonym, logged like a UID (SECURITY.md, "Logging"): this test does not
forbid it, but records where it appears. It also records (``record_property``) where the
needles lie elsewhere under the stack's folder: the stores that are meant to hold PHI.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from conftest import KAFKA_LIBS, ROOT
from devtools import cli
from devtools.browser import launch_options
from devtools.cli import PATIENT_SCOPES
from devtools.kafka_local import free_port
from devtools.peers import storescu
from devtools.stack import Ports, Stack, StackConfig, dev_tokens
from devtools.testing import wait_for
from scanwatch import ids
from scanwatch.sample import build_mr_study
from services.auth.scopes import parse_scopes

#: The whole stack with Rasa starts in minutes on a loaded machine; the path then runs once.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2100)]

CHAT_MODELS = ROOT / "var" / "chatbot" / "models"
PASSWORD = "a-long-pass phrase for the phi path"

#: The sample patient: distinctive, so that a hit is a leak and not a coincidence.
FAMILY, GIVEN, MIDDLE = "Zwanenburgh", "Ottoline", "Quenby"
PATIENT_NAME = f"{FAMILY}^{GIVEN}^{MIDDLE}"  # DICOM PN: family^given^middle
BIRTH_DATE = date(1937, 11, 23)
PATIENT_ID = "PHI-7Q3X9K2"


def needles() -> dict[str, str]:
    """Every rendering of the patient's PHI that must not appear, by what it stands for.
    Matching is case-insensitive; each name part is a needle of its own, so the name with
    ``^``, with spaces, reversed or URL-encoded is caught too."""
    d = BIRTH_DATE
    dates = {
        d.strftime("%Y%m%d"),  # DICOM DA
        d.isoformat(),  # FHIR birthDate
        d.strftime("%d/%m/%Y"),
        d.strftime("%m/%d/%Y"),
        d.strftime("%d.%m.%Y"),
        f"{d.day} {d:%B %Y}",
        f"{d:%B} {d.day}, {d.year}",
        f"{d.day} {d:%b %Y}",
    }
    return {
        **{part: "PatientName" for part in (FAMILY, GIVEN, MIDDLE)},
        PATIENT_NAME: "PatientName",
        f"{GIVEN} {FAMILY}": "PatientName",
        **dict.fromkeys(dates, "PatientBirthDate"),
        PATIENT_ID: "PatientID",
    }


def found_in(text: str) -> list[str]:
    low = text.lower()
    return sorted(
        {f"{what} ({needle!r})" for needle, what in needles().items() if needle.lower() in low}
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default model (with its heatmap signature) as version 1."""
    from training.default_model import ensure_default_model

    repository = tmp_path_factory.mktemp("models")
    ensure_default_model(repository)
    return repository


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Stack]:
    if not list(CHAT_MODELS.glob("*.tar.gz")):
        pytest.fail(f"no trained chatbot model in {CHAT_MODELS} (scripts/bootstrap.sh trains it)")
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    config = StackConfig(
        var=tmp_path_factory.mktemp("no-phi"),
        ports=ports,
        quiet_period_s=2.0,
        models=models,
        kafka_libs=KAFKA_LIBS,
        chatbot=True,
        chat_models=CHAT_MODELS,
        # Everything `scanwatch run` starts but the training worker (TensorFlow training
        # is not on this path; it logs no patient data: it reads none).
        only=(
            "model-server",
            "fhir-api",
            "inference-worker",
            "dicom-listener",
            "chat-actions",
            "chat",
            "portal",
            "console",
        ),
        extra_env={
            # One Rasa process instead of two: the same logging, half the start-up load.
            "SANIC_WORKERS": "1",
        },
    )
    running = Stack(config)
    try:
        running.start(timeout=900)  # Rasa loads its model in minutes under load
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**launch_options())
        yield chromium
        chromium.close()


def phi_study(folder: Path) -> list[Path]:
    """The sample MR study, its patient renamed to the distinctive one above."""
    files = build_mr_study(folder, patient_id=PATIENT_ID, n_slices=12, seed=5)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientBirthDate = BIRTH_DATE.strftime("%Y%m%d")
        ds.save_as(path, enforce_file_format=True)
    return files


def metrics_urls(stack: Stack) -> dict[str, str]:
    p = stack.config.ports
    return {
        "fhir-api": f"http://127.0.0.1:{p.fhir}/metrics",
        "inference-worker": f"http://127.0.0.1:{p.worker_web}/metrics",
        "dicom-listener": f"http://127.0.0.1:{p.listener_metrics}/metrics",
        "dicom-listener publisher": f"http://127.0.0.1:{p.listener_publisher_metrics}/metrics",
        "model-server": f"http://127.0.0.1:{p.model_server_metrics}/metrics",
        "portal": f"{stack.config.portal_url}/metrics",
        "console": f"http://127.0.0.1:{p.console}/metrics",
    }


def drive_the_path(stack: Stack, browser: Browser, tmp_path: Path, monkeypatch) -> str:
    """Everything a study and its patient go through; returns the study's UID."""
    files = phi_study(tmp_path / "study")
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    storescu(files, "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title)

    # An EHR: reads and searches, some of them by the patient's name, birth date, identifier.
    system = cli.dev_token(stack.config.var, "system/*.read")
    ehr = httpx.Client(
        base_url=stack.config.fhir_base, headers={"Authorization": f"Bearer {system}"}, timeout=30
    )
    patient = ids.patient_id(None, PATIENT_ID)

    def scored() -> bool:
        return bool(ehr.get("/Observation", params={"patient": patient}).json().get("total"))

    wait_for(scored, 240, "the study's Observation")
    assert ehr.get(f"/Patient/{patient}").json()["birthDate"] == BIRTH_DATE.isoformat()
    for query in (
        {"name": FAMILY},
        {"family": FAMILY, "given": GIVEN},
        {"birthdate": BIRTH_DATE.isoformat()},
        {"identifier": PATIENT_ID},
    ):
        # A search the API does not support answers an OperationOutcome: its URL still went
        # through every layer that might log it.
        assert ehr.get("/Patient", params=query).status_code in (200, 400), query
    for kind in ("ImagingStudy", "DiagnosticReport", "Observation"):
        assert ehr.get(f"/{kind}", params={"patient": patient}).status_code == 200
    ehr.get(f"/Patient/{PATIENT_ID}")  # a wrong id, as an integration engine might send
    ehr.close()

    # DICOMweb as an outside viewer uses it: a search by name and by PatientID.
    dicomweb = f"http://127.0.0.1:{stack.config.ports.console}/dicomweb"
    headers = {"Authorization": f"Bearer {system}"}
    by_name = httpx.get(
        f"{dicomweb}/studies", params={"PatientName": f"{FAMILY}*"}, headers=headers, timeout=30
    )
    assert by_name.status_code == 200 and uid in by_name.text, by_name.text[:300]
    by_id = httpx.get(
        f"{dicomweb}/studies", params={"PatientID": PATIENT_ID}, headers=headers, timeout=30
    )
    assert by_id.status_code == 200 and uid in by_id.text
    metadata = httpx.get(f"{dicomweb}/studies/{uid}/metadata", headers=headers, timeout=60)
    assert metadata.status_code == 200 and FAMILY in metadata.text

    # A clinician: the worklist, then the viewer (each opening audited).
    console = f"http://127.0.0.1:{stack.config.ports.console}"
    found = re.search(r"\(development login: (\S+) / (\S+),", stack.banner())
    assert found is not None, stack.banner()
    username, password = found.groups()
    staff = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    staff.set_default_timeout(20_000)
    page = staff.new_page()
    page.goto(f"{console}/signin")
    page.get_by_role("link", name="Sign in").click()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{console}/worklist")
    row = page.locator(f'tr[data-study="{uid}"]')
    expect(row).to_contain_text("Scored", timeout=180_000)
    row.get_by_role("link").first.click()
    expect(page).to_have_url(f"{console}/studies/{uid}")
    expect(page.get_by_role("img", name=re.compile(r"^Slice"))).to_be_visible()
    staff.close()

    # The patient: activation, sign-in, the portal's results; then the chatbot, told PHI.
    monkeypatch.setenv("SCANWATCH_AUTH_ISSUER", f"http://127.0.0.1:{stack.config.ports.fhir}")
    link = cli.invite_link(stack.config.var, PATIENT_ID)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    context.set_default_timeout(20_000)
    portal = context.new_page()
    portal.goto(link)
    portal.get_by_label("Username").fill("phi-path-patient")
    portal.get_by_label("New password", exact=True).fill(PASSWORD)
    portal.get_by_label("New password again").fill(PASSWORD)
    portal.get_by_role("button", name="Create my account").click()
    expect(portal.get_by_text("Your account is ready")).to_be_visible()
    portal.goto(f"{stack.config.portal_url}/signin")
    portal.get_by_role("link", name="Sign in").click()
    portal.get_by_label("Username").fill("phi-path-patient")
    portal.get_by_label("Password", exact=True).fill(PASSWORD)
    portal.get_by_role("button", name="Sign in").click()
    expect(portal.get_by_role("list", name="Scans").get_by_role("listitem")).to_have_count(1)
    context.close()

    issued = dev_tokens(stack.config.var).issue(
        "test-portal", parse_scopes(PATIENT_SCOPES), patient
    )
    for message in (
        f"hello, I am {GIVEN} {FAMILY}, born {BIRTH_DATE.isoformat()}, my number is {PATIENT_ID}",
        "what did my scan show?",
    ):
        answer = httpx.post(
            stack.config.chat_url,
            json={"message": message},
            headers={"Authorization": f"Bearer {issued[0]}"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
    assert "preliminary AI result" in " ".join(m.get("text") or "" for m in answer.json())
    return str(uid)


def test_no_phi_in_any_log_or_metric(
    stack: Stack, browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property
) -> None:
    drive_the_path(stack, browser, tmp_path, monkeypatch)

    # Every /metrics (an HTTP API like any other: read with a backend's token).
    system = cli.dev_token(stack.config.var, "system/*.read")
    leaks: dict[str, list[str]] = {}
    for name, url in metrics_urls(stack).items():
        answer = httpx.get(url, headers={"Authorization": f"Bearer {system}"}, timeout=30)
        assert answer.status_code == 200, f"{name} {url}: {answer.status_code}"
        assert "# TYPE" in answer.text, f"{name}: not a Prometheus answer"
        if hits := found_in(answer.text):
            leaks[f"{name} /metrics"] = hits

    # Every log line of every service, and the broker's own logs.
    logs = sorted(stack.logs.glob("*.log"))
    assert {p.stem for p in logs} >= set(stack.config.only or ()), logs
    kafka_logs = sorted(stack.kafka.home.glob("*.log"))
    assert kafka_logs, "the broker wrote no log"
    for path in [*logs, *kafka_logs]:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if hits := found_in(line):
                leaks.setdefault(f"{path.name}:{number}", hits)

    # Where the PHI does lie (the stores meant to hold it) and where the FHIR Patient id is
    # logged: recorded for SECURITY.md, not failures.
    pseudonym = ids.patient_id(None, PATIENT_ID)
    holders, with_pseudonym = [], []
    for path in sorted(p for p in stack.config.var.rglob("*") if p.is_file()):
        data = path.read_bytes().lower()
        if any(n.lower().encode() in data for n in needles()):
            holders.append(str(path.relative_to(stack.config.var)))
        if path.suffix == ".log" and pseudonym.encode() in data:
            with_pseudonym.append(path.name)
    record_property("phi_at_rest", holders)
    record_property("logs_with_fhir_patient_id", with_pseudonym)

    assert not leaks, f"PHI in logs or metrics: {leaks}"
    # The broker's data holds the events: claim checks, never patient data (schemas/).
    broker = [h for h in holders if h.startswith("kafka/")]
    assert not broker, f"PHI in Kafka's data: {broker}"
