"""The operator's pages in Chromium, against the real authorization server, a real Kafka broker
and the real training worker: an operator promotes a version and sees the worker's answer
arrive live, is refused a worse one with the rule's reason, starts a training job (a bad
epoch count is named) and follows it to its end, reads consumer lag and a dead letter (its
reason shown as text, markup and all) and re-drives it onto its topic; a clinician reaches
none of it. axe-core on every page; screenshots under var/screenshots/console/."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyotp
import pytest
from playwright.sync_api import Page, expect

from devtools.kafka_local import LocalKafka, free_port, read_topic
from devtools.testing import served, wait_for
from scanwatch import kafka as kafka_adapter
from scanwatch.model_registry import Registry
from schemas.events import DeadLetterV1, StudyReadyV1
from services.auth import clients
from services.console.app import create_app as create_console
from services.console.config import Settings as ConsoleSettings
from services.console.tests.test_web_browser import AXE, SHOTS, activate, axe_check
from services.console.tests.test_web_browser import sign_in as staff_sign_in
from services.fhir_api.app import create_app as create_fhir
from services.fhir_api.config import Settings as FhirSettings

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
CONSOLE_CLIENT = "test-console-ops"
#: Not "brain": the training tests' workers read the same topics in the same session.
MODEL = "operator-page"
#: How long a page may wait for the training worker's answer over Kafka (a loaded machine).
ANSWER_MS = 60_000


@dataclass
class Site:
    console: str
    totp: dict[str, str]
    registry: Registry
    versions: tuple[int, int]  # a good candidate, a worse one
    kafka: LocalKafka

    def code(self, username: str) -> str:
        """The next step's TOTP code (activation spent the current one; a code works once)."""
        return pyotp.TOTP(self.totp[username]).at(datetime.now(UTC), counter_offset=1)


@pytest.fixture(scope="module")
def site(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from services.model_server.app import create_server
    from services.model_server.config import Settings as ModelServerSettings
    from training.config import TrainSettings
    from training.events import KafkaEvents
    from training.tests.test_training_worker import candidate, failing_runner
    from training.worker import TrainingWorker

    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing (scripts/bootstrap.sh runs npm ci in services/portal)")
    kafka_adapter.ensure_topics(kafka.bootstrap_servers)
    var = tmp_path_factory.mktemp("console-ops")
    repository = var / "models"
    registry = Registry(repository)
    versions = (candidate(registry, 0.9, MODEL), candidate(registry, 0.5, MODEL))
    events = KafkaEvents(kafka.bootstrap_servers)
    worker = TrainingWorker(
        TrainSettings(
            repository=repository,
            runs_dir=var / "runs",
            kafka_bootstrap_servers=kafka.bootstrap_servers,
        ),
        events,
        runner=failing_runner,  # a requested job fails at once, with its reason
        group_id=f"t-{uuid.uuid4().hex}",
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    model_server = create_server(
        ModelServerSettings(
            port=0,
            metrics_port=0,
            model_base_path=repository,
            model_name=MODEL,
            poll_interval_s=0.2,
        )
    )
    model_server.start()

    fhir_app = create_fhir(
        FhirSettings(
            database_url=f"sqlite:///{var / 'fhir.db'}",
            auth_mode="required",
            signing_keys_file=var / "keys.json",
        )
    )
    fhir_port, console_port = free_port(), free_port()
    try:
        with served(fhir_app, fhir_port):
            base = f"http://127.0.0.1:{fhir_port}"
            engine = fhir_app.state.store.engine
            console_url = f"http://127.0.0.1:{console_port}"
            secret = clients.register_staff_app(
                engine, CONSOLE_CLIENT, [f"{console_url}/callback"], description="Staff console"
            )
            # A TOTP code works once: each test signs in with an account of its own.
            totp = {
                name: activate(base, engine, name, role)
                for name, role in (
                    ("ops.models", "operator"),
                    ("ops.jobs", "operator"),
                    ("ops.pipeline", "operator"),
                    ("ops.forged", "operator"),
                    ("dr.carl", "clinician"),
                )
            }
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
                kafka_bootstrap_servers=kafka.bootstrap_servers,
                model_repository=repository,
                listener_health_url=f"http://127.0.0.1:{free_port()}/healthz",  # not running
                model_server=model_server.address,
                model_name=MODEL,
            )
            with served(create_console(settings), console_port):
                yield Site(console_url, totp, registry, versions, kafka)
    finally:
        model_server.stop(grace_s=1.0)
        stop.set()
        thread.join(timeout=30)
        events.close()


def sign_in(page: Page, site: Site, username: str) -> None:
    staff_sign_in(page, site, username)  # type: ignore[arg-type]  # a Site signs in alike
    expect(page).to_have_url(f"{site.console}/worklist")


def test_an_operator_promotes_and_is_refused_a_worse_version(site: Site, page: Page) -> None:
    good, worse = site.versions
    sign_in(page, site, "ops.models")
    page.get_by_role("link", name="Models").click()
    expect(page.get_by_role("heading", name=MODEL)).to_be_visible()
    axe_check(page, "the models page")
    page.get_by_role("button", name=f"Promote {MODEL} version {good}").click()
    # The worker's answer arrives over Kafka; the page updates itself.
    done = page.get_by_text(f"Done: {MODEL} version {good} is now served")
    expect(done).to_be_visible(timeout=ANSWER_MS)
    assert site.registry.served_versions(MODEL) == [good]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "operator-models.png"), full_page=True)

    page.get_by_role("button", name=f"Promote {MODEL} version {worse}").click()
    refusal = page.get_by_role("alert")
    expect(refusal).to_contain_text("Refused", timeout=ANSWER_MS)
    expect(refusal).to_contain_text("below")
    assert site.registry.served_versions(MODEL) == [good]


def test_an_operator_starts_a_job_and_follows_it(site: Site, page: Page) -> None:
    sign_in(page, site, "ops.jobs")
    page.goto(f"{site.console}/operator/jobs")
    axe_check(page, "the training jobs page")
    page.get_by_label("Model name").fill(MODEL)
    page.get_by_label("Epochs").fill("two")
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_role("alert")).to_contain_text("'two' is not a whole number")
    page.get_by_label("Epochs").fill("2")
    page.get_by_role("button", name="Start training").click()
    expect(page).to_have_url(f"{site.console}/operator/jobs/" + page.url.rsplit("/", 1)[-1])
    # The worker takes it (queued) and, with this test's runner, fails it with the reason.
    expect(page.get_by_text("dataset folder is empty")).to_be_visible(timeout=ANSWER_MS)
    axe_check(page, "a training job's page")
    page.get_by_role("link", name="All training jobs").click()
    expect(page.get_by_role("cell", name="failed").first).to_be_visible()


def test_an_operator_reads_lag_and_re_drives_a_dead_letter(site: Site, page: Page) -> None:
    study = f"1.2.826.0.1.3680043.9.{uuid.uuid4().int % 10**10}"
    payload = json.dumps({"study_instance_uid": study, "marker": uuid.uuid4().hex})
    producer = kafka_adapter.EventProducer(site.kafka.bootstrap_servers, "t", timeout_s=30)
    producer.send_event(
        DeadLetterV1(
            source_topic=StudyReadyV1.SCHEMA,
            key=study,
            reason="no usable series <b>axial</b>",
            error_class="unusable",
            payload=payload,
        ),
        key=study,
        topic=f"{StudyReadyV1.SCHEMA}.dlq",
    )
    producer.close()
    good = site.versions[0]
    if not site.registry.served_versions(MODEL):  # this test alone: serve one version
        site.registry.promote(MODEL, good, force=True)
    sign_in(page, site, "ops.pipeline")
    page.goto(f"{site.console}/operator/pipeline")
    expect(page.get_by_text("The listener did not answer its health check.")).to_be_visible()
    # The model server, asked over gRPC (GetModelStatus): the served version is AVAILABLE
    # once it has loaded it (the page is read again until then).
    serving = page.get_by_role("row").filter(has_text="Serving")

    def shown() -> bool:
        if serving.count():
            return True
        page.reload()
        return False

    wait_for(shown, 60, "the served version on the pipeline page")
    expect(serving).to_contain_text(f"{site.registry.served_versions(MODEL)[-1]}")
    expect(serving).to_contain_text("AVAILABLE")
    expect(page.get_by_role("heading", name="Consumer lag")).to_be_visible()
    row = page.get_by_role("row").filter(has_text=study)
    expect(row.get_by_text("no usable series <b>axial</b>")).to_be_visible()  # as text
    axe_check(page, "the pipeline page")
    page.screenshot(path=str(SHOTS / "operator-pipeline.png"), full_page=True)
    row.get_by_role("button", name="Re-drive").click()
    expect(page.get_by_text("was put back on its topic")).to_be_visible()
    back = read_topic(
        site.kafka.bootstrap_servers,
        StudyReadyV1.SCHEMA,
        lambda records: any(r.value == payload.encode() for r in records),
        timeout=60,
    )
    assert [r.key for r in back if r.value == payload.encode()] == [study.encode()]


def test_a_clinician_reaches_no_operator_page(site: Site, page: Page) -> None:
    sign_in(page, site, "dr.carl")
    expect(page.get_by_role("link", name="Models")).to_have_count(0)
    for path in ("/operator/models", "/operator/jobs", "/operator/pipeline"):
        answer = page.goto(f"{site.console}{path}")
        assert answer is not None and answer.status == 403, path
    promote = page.request.post(
        f"{site.console}/operator/models/{MODEL}/{site.versions[1]}/promote",
        form={"csrf_token": "x"},
    )
    assert promote.status == 403
    redrive = page.request.post(
        f"{site.console}/operator/dead-letters/redrive", form={"letter": "a:0:0"}
    )
    assert redrive.status == 403


def test_a_forged_operator_form_is_refused(site: Site, page: Page) -> None:
    sign_in(page, site, "ops.forged")
    before = site.registry.served_versions(MODEL)
    for path, form in (
        (f"/operator/models/{MODEL}/{site.versions[1]}/promote", {"csrf_token": "forged"}),
        ("/operator/dead-letters/redrive", {"letter": "x:0:0"}),
        ("/operator/jobs", {"model_name": MODEL, "csrf_token": ""}),
    ):
        forged = page.request.post(f"{site.console}{path}", form=form)
        assert forged.status == 403, path
    assert site.registry.served_versions(MODEL) == before
