"""End to end: a real MR series sent with dcmtk's storescu becomes a FHIR Observation.

Everything is real: the Kafka broker, the DICOM listener, the Faust worker, the model server
running the EfficientNet SavedModel from the model repository, and the FHIR API — each started as
its own process by the same :class:`devtools.stack.Stack` that ``scanwatch run`` uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from conftest import KAFKA_LIBS
from devtools.kafka_local import Record, free_port, read_topic
from devtools.peers import storescu
from devtools.stack import Ports, Stack, StackConfig
from devtools.testing import wait_for
from scanwatch import ids
from scanwatch.fhir_codes import PROBABILITY_CODE_PREFIX
from scanwatch.sample import build_mr_study
from schemas import InstanceReceivedV1, StudyReadyV1
from services.console.pipeline import Lag, consumer_lag

pytestmark = pytest.mark.e2e

QUIET_PERIOD_S = 2.0
#: The study's slices: the worker scores the whole series by default (max_gap_mm unset), and
#: so stores a heatmap per slice.
SCORED_SLICES = 20


#: Two worker processes share the partitions, as in a scaled-out deployment (their web ports
#: are worker_web and the one above it, which free_port keeps free too).
WORKERS = 2
#: A sender whose studies get a longer quiet period (the paused-worker test).
PAUSED_SENDER, PAUSED_QUIET_S = "PAUSEDSCU", 20.0  # the first half is committed within it
#: A modality that reports procedure steps: its quiet period is longer than the test waits, so
#: only the completed step can release its study.
MPPS_SENDER, MPPS_QUIET_S = "MPPSSCU", 600.0
#: A sender trusted on its instances' counts (ImagesInAcquisition), with the same long quiet
#: period: only the counts can release its study.
COUNTED_SENDER = "COUNTEDSCU"
#: Their consumer group (inference_worker.config.Settings.app_id's default).
WORKER_GROUP = "scanwatch-inference-worker"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh model repository with the shipped default model as version 1, as the bootstrap
    makes it on a fresh clone (var/models may hold an older export without heatmaps)."""
    from training.default_model import ensure_default_model

    repository = tmp_path_factory.mktemp("models")
    ensure_default_model(repository)
    return repository


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Stack]:
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    config = StackConfig(
        var=tmp_path_factory.mktemp("stack"),
        ports=ports,
        workers=WORKERS,
        quiet_period_s=QUIET_PERIOD_S,
        # Short retry and parking times, so that an outage test parks a study within seconds.
        extra_env={
            "SCANWATCH_WORKER_RETRIES": "2",
            "SCANWATCH_WORKER_PARK_S": "3",
            "SCANWATCH_WORKER_BREAKER_RESET_S": "2",
            # The paused-worker test's sender: long enough to see its first half read first.
            "SCANWATCH_WORKER_QUIET_PERIOD_BY_SOURCE": (
                f'{{"{PAUSED_SENDER}": {PAUSED_QUIET_S}, "{MPPS_SENDER}": {MPPS_QUIET_S}, '
                f'"{COUNTED_SENDER}": {MPPS_QUIET_S}}}'
            ),
            "SCANWATCH_WORKER_COMPLETE_BY_HEADERS": f'["{COUNTED_SENDER}"]',
        },
        models=models,
        kafka_libs=KAFKA_LIBS,
    )
    running = Stack(config)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_storescu_study_becomes_a_queryable_observation(
    stack: Stack, tmp_path: Path, record_property
):
    files = build_mr_study(tmp_path / "study", patient_id="SW-E2E-0001", n_slices=20)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    port = stack.config.ports.dicom
    storescu(files, "127.0.0.1", port, called_ae=stack.config.ae_title)
    sent = time.monotonic()

    patient = ids.patient_id(None, "SW-E2E-0001")
    fhir = stack.config.fhir_base

    def observations():
        bundle = httpx.get(
            f"{fhir}/Observation", params={"patient": patient}, headers=stack.fhir_headers()
        ).json()
        return bundle if bundle.get("total") else None

    bundle = wait_for(observations, timeout=180)
    latency = time.monotonic() - sent
    record_property("seconds_from_storescu_to_observation", round(latency, 2))
    record_property("quiet_period_s", QUIET_PERIOD_S)

    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == 1
    obs = bundle["entry"][0]["resource"]
    model_name = stack.config.model_name
    assert obs["subject"]["reference"] == f"Patient/{patient}"
    assert obs["derivedFrom"] == [{"reference": f"ImagingStudy/{ids.imaging_study_id(study_uid)}"}]
    assert obs["id"] == ids.observation_id(study_uid, model_name, 1)
    assert obs["identifier"][0]["value"] == obs["id"]
    assert obs["device"]["reference"] == f"Device/{ids.device_id(model_name, 1)}"

    probabilities = [
        c["valueQuantity"]["value"]
        for c in obs["component"]
        if c["code"]["coding"][0]["code"].startswith(PROBABILITY_CODE_PREFIX)
    ]
    assert len(probabilities) == 4  # normal, mass, bleed, infarct
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert obs["valueQuantity"]["value"] == pytest.approx(1 - probabilities[0], abs=1e-3)

    device = httpx.get(
        f"{fhir}/Device/{ids.device_id(model_name, 1)}", headers=stack.fhir_headers()
    ).json()
    assert device["version"][0]["value"] == "1"

    # The heatmaps follow the score: a Secondary Capture series beside the study, listed in
    # the ImagingStudy the Observation derives from, one instance per slice. On a loaded
    # machine the quiet period can pass mid-send (issue 20, point 6): the study is then
    # scored on its first slices and amended when the rest arrive, so wait for the whole one.
    def with_heatmaps():
        study = httpx.get(
            f"{fhir}/ImagingStudy/{ids.imaging_study_id(study_uid)}", headers=stack.fhir_headers()
        ).json()
        series = study.get("series", [])
        whole = len(series) == 2 and series[1]["numberOfInstances"] == SCORED_SLICES
        return study if whole else None

    study = wait_for(
        with_heatmaps, timeout=180, what=f"{SCORED_SLICES} heatmaps in the ImagingStudy"
    )
    heatmap_series = study["series"][1]
    assert heatmap_series["modality"]["code"] == "OT"
    assert study["numberOfInstances"] == len(files) + SCORED_SLICES
    folder = stack.config.var / "store" / study_uid / heatmap_series["uid"]
    heatmaps = sorted(folder.glob("*.dcm"))
    assert {p.stem for p in heatmaps} == {i["uid"] for i in heatmap_series["instance"]}
    first = pydicom.dcmread(heatmaps[0])
    assert first.StudyInstanceUID == study_uid and first.Modality == "OT"
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
    stored = list((stack.config.var / "store").rglob("*.dcm"))
    assert len(stored) == len(files) + SCORED_SLICES


def observations_of(stack: Stack, patient_id: str) -> dict:
    patient = ids.patient_id(None, patient_id)
    return httpx.get(
        f"{stack.config.fhir_base}/Observation",
        params={"patient": patient},
        headers=stack.fhir_headers(),
    ).json()


def test_concurrent_studies_each_get_exactly_one_observation(stack: Stack, tmp_path: Path):
    patients = [f"SW-E2E-CONC-{n}" for n in range(4)]
    studies = {
        p: build_mr_study(tmp_path / p, patient_id=p, n_slices=8, seed=n)
        for n, p in enumerate(patients)
    }
    senders = [
        threading.Thread(
            target=storescu,
            args=(files, "127.0.0.1", stack.config.ports.dicom),
            kwargs={"called_ae": stack.config.ae_title},
        )
        for files in studies.values()
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()

    for patient in patients:
        bundle = wait_for(lambda p=patient: observations_of(stack, p).get("total"), timeout=180)
        assert bundle == 1, f"{patient}: {bundle} Observations"
    # Each study was scored by exactly one of the two workers: no rewrite of any Observation.
    for patient in patients:
        [entry] = observations_of(stack, patient)["entry"]
        assert entry["resource"]["meta"]["versionId"] == "1"


def test_study_survives_a_worker_kill_9(stack: Stack, tmp_path: Path):
    files = build_mr_study(tmp_path / "killed", patient_id="SW-E2E-KILL", n_slices=8, seed=9)
    storescu(files, "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title)
    # Inside the quiet period: the study is assembled in the workers' table but not scored.
    workers = [s for s in stack.services if s.name.startswith("inference-worker")]
    restarts = [w.restarts for w in workers]
    for worker in workers:
        stack.kill(worker.name)
    wait_for(lambda: all(w.restarts > r for w, r in zip(workers, restarts, strict=True)), 60)

    assert wait_for(lambda: observations_of(stack, "SW-E2E-KILL").get("total"), 240) == 1


def test_late_instances_amend_the_observation(stack: Stack, tmp_path: Path):
    files = build_mr_study(tmp_path / "late", patient_id="SW-E2E-LATE", n_slices=10, seed=3)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    send = lambda batch: storescu(  # noqa: E731
        batch, "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title
    )
    send(files[:6])
    wait_for(lambda: observations_of(stack, "SW-E2E-LATE").get("total"), 180)
    send(files[6:])  # arrives after the study was scored

    def amended():
        bundle = observations_of(stack, "SW-E2E-LATE")
        entry = bundle["entry"][0]["resource"]
        return bundle if entry["meta"]["versionId"] == "2" else None

    bundle = wait_for(amended, 180)
    assert bundle["total"] == 1  # the same Observation, amended: not a second one
    fhir = stack.config.fhir_base

    def with_all_heatmaps():
        imaging = httpx.get(
            f"{fhir}/ImagingStudy/{ids.imaging_study_id(study_uid)}", headers=stack.fhir_headers()
        ).json()
        series = imaging.get("series", [])
        return imaging if len(series) == 2 and series[1]["numberOfInstances"] == 10 else None

    # Every instance counted, and a heatmap for each of the 10 slices now scored.
    imaging = wait_for(with_all_heatmaps, 120, "heatmaps of the late slices too")
    assert imaging["series"][0]["numberOfInstances"] == len(files)
    assert imaging["numberOfInstances"] == len(files) + 10


def worker_metric(stack: Stack, name: str) -> float:
    total = 0.0
    for n in range(WORKERS):
        text = httpx.get(f"http://127.0.0.1:{stack.config.ports.worker_web + n}/metrics").text
        total += sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
        )
    return total


def test_model_server_outage_parks_the_study_and_loses_nothing(stack: Stack, tmp_path: Path):
    files = build_mr_study(tmp_path / "outage", patient_id="SW-E2E-OUTAGE", n_slices=8, seed=5)
    study = f"{stack.config.fhir_base}/ImagingStudy/"
    study += ids.imaging_study_id(
        pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    )
    parked_before = worker_metric(stack, "scanwatch_worker_studies_parked_total")
    stack.hold("model-server")
    try:
        storescu(files, "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title)
        wait_for(
            lambda: worker_metric(stack, "scanwatch_worker_studies_parked_total") > parked_before,
            120,
        )
        assert not observations_of(stack, "SW-E2E-OUTAGE").get("total")
        # Received, not scored: what a patient asking now is told.
        assert httpx.get(study, headers=stack.fhir_headers()).json()["status"] == "registered"
    finally:
        stack.release("model-server")
    assert wait_for(lambda: observations_of(stack, "SW-E2E-OUTAGE").get("total"), 180) == 1
    assert httpx.get(study, headers=stack.fhir_headers()).json()["status"] == "available"


def test_unusable_study_goes_to_the_dead_letter_topic(stack: Stack, tmp_path: Path):
    from schemas import DeadLetterV1, StudyReadyV1, dlq

    [path] = build_mr_study(tmp_path / "bad", patient_id="SW-E2E-BAD", n_slices=1, seed=7)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # half the pixels: undecodable
    ds.save_as(path)
    study_uid = ds.StudyInstanceUID
    storescu([path], "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title)

    records = read_topic(
        stack.kafka.bootstrap_servers,
        dlq(StudyReadyV1.SCHEMA),
        until=lambda read: any(r.key == study_uid.encode() for r in read),
        timeout=120,
    )
    [dead] = [DeadLetterV1.from_bytes(r.value) for r in records if r.key == study_uid.encode()]
    assert dead.error_class == "unusable"
    assert "cannot decode pixels" in dead.reason
    assert StudyReadyV1.from_bytes(dead.payload).StudyInstanceUID == study_uid
    assert not observations_of(stack, "SW-E2E-BAD").get("total")


def test_paused_workers_score_a_study_once_with_every_slice(stack: Stack, tmp_path: Path):
    """Issue 20, point 6: the workers read a study's first half, then stop (SIGSTOP: starved
    of CPU) while its second half arrives, for longer than the quiet period. Resumed, they
    release the study once, with every slice, instead of its first half and then again (the
    old rule, the quiet period on the worker's clock from when it read the first half, did)."""
    files = build_mr_study(tmp_path / "study", patient_id="SW-E2E-PAUSE", n_slices=SCORED_SLICES)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    dicom = ("127.0.0.1", stack.config.ports.dicom)
    workers = [f"inference-worker-{n}" for n in range(1, WORKERS + 1)]
    half = SCORED_SLICES // 2

    def workers_lag() -> Lag | None:
        """The workers' lag on the instance topic (None: nothing committed there yet)."""
        found = consumer_lag(stack.bootstrap_servers)
        return next(
            (g for g in found if g.group == WORKER_GROUP and g.topic == InstanceReceivedV1.SCHEMA),
            None,
        )

    before = lag.newest if (lag := workers_lag()) else 0
    send = {"called_ae": stack.config.ae_title, "calling_ae": PAUSED_SENDER}
    storescu(files[:half], *dicom, **send)
    # Read (and committed, which takes Faust a few seconds) inside the sender's quiet period.
    wait_for(
        lambda: (lag := workers_lag()) and lag.newest >= before + half and lag.lag == 0,
        timeout=PAUSED_QUIET_S,
        what="the first half on Kafka, read and committed by the workers",
    )
    for worker in workers:
        stack.pause(worker)
    try:
        storescu(files[half:], *dicom, **send)
        # The fault itself: the pause outlasts the quiet period after the last instance.
        threading.Event().wait(PAUSED_QUIET_S + 1)
    finally:
        for worker in workers:
            stack.resume(worker)

    def ready_events(records: list[Record]) -> list[StudyReadyV1]:
        return [StudyReadyV1.from_bytes(r.value) for r in records if r.key == study_uid.encode()]

    records = read_topic(
        stack.bootstrap_servers,
        StudyReadyV1.SCHEMA,
        lambda rs: any(len(e.instances) == SCORED_SLICES for e in ready_events(rs)),
        timeout=180,
    )
    assert [len(e.instances) for e in ready_events(records)] == [SCORED_SLICES]


def assert_scored_once_whole_without_quiet(stack: Stack, patient_id: str, study_uid: str) -> None:
    """The study's Observation appears within 120 s (its sender's quiet period is 600 s), from
    one ready event with every slice and a quiet period of 0: released as complete."""
    wait_for(
        lambda: observations_of(stack, patient_id).get("total") == 1,
        timeout=120,
        what=f"{patient_id}'s Observation, before its sender's quiet period",
    )
    records = read_topic(
        stack.bootstrap_servers,
        StudyReadyV1.SCHEMA,
        lambda rs: any(r.key == study_uid.encode() for r in rs),
        timeout=30,
    )
    ready = [StudyReadyV1.from_bytes(r.value) for r in records if r.key == study_uid.encode()]
    assert [(len(e.instances), e.quiet_period_s) for e in ready] == [(SCORED_SLICES, 0.0)]


def test_a_completed_procedure_step_scores_its_study_without_the_quiet_period(
    stack: Stack, tmp_path: Path
):
    """Issue 20, point 1: the modality reports its Performed Procedure Step (pynetdicom as the
    MPPS SCU): created before its images, completed after them naming every one. The study is
    scored once, with every slice, long before its sender's quiet period (600 s) is over."""
    from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

    from dicom_listener.tests.test_procedure_steps import completed, in_progress, mpps_association

    files = build_mr_study(tmp_path / "study", patient_id="SW-E2E-MPPS", n_slices=SCORED_SLICES)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    study_uid, series_uid = headers[0].StudyInstanceUID, headers[0].SeriesInstanceUID
    port, step_uid = stack.config.ports.dicom, pydicom.uid.generate_uid()
    mpps = ModalityPerformedProcedureStep
    with mpps_association(port, MPPS_SENDER, stack.config.ae_title) as assoc:
        assert assoc.send_n_create(in_progress(study_uid), mpps, step_uid)[0].Status == 0
    storescu(files, "127.0.0.1", port, called_ae=stack.config.ae_title, calling_ae=MPPS_SENDER)
    done = completed({series_uid: [h.SOPInstanceUID for h in headers]})
    with mpps_association(port, MPPS_SENDER, stack.config.ae_title) as assoc:
        assert assoc.send_n_set(done, mpps, step_uid)[0].Status == 0

    assert_scored_once_whole_without_quiet(stack, "SW-E2E-MPPS", study_uid)


def test_a_sender_trusted_on_its_counts_gets_its_study_scored_without_the_quiet_period(
    stack: Stack, tmp_path: Path
):
    """Issue 20, point 3: the instances say how many the acquisition has (ImagesInAcquisition);
    the listener passes the counts on as Kafka headers, and the worker, trusting this sender
    on them, releases the study once the last one is read, not after its 600 s quiet period."""
    files = build_mr_study(tmp_path / "study", patient_id="SW-E2E-COUNT", n_slices=SCORED_SLICES)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = len(files)
        ds.save_as(path)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    port = stack.config.ports.dicom
    storescu(files, "127.0.0.1", port, called_ae=stack.config.ae_title, calling_ae=COUNTED_SENDER)
    assert_scored_once_whole_without_quiet(stack, "SW-E2E-COUNT", study_uid)
