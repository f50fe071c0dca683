"""End to end: a real MR series sent with dcmtk's storescu becomes a FHIR Observation.

Everything is real: the Kafka broker, the DICOM listener, the Faust worker, the model server
running the EfficientNet SavedModel from the model repository, and the FHIR API — each started as
its own process by the same :class:`scanwatch.devstack.Stack` that ``scanwatch run`` uses.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from conftest import KAFKA_LIBS, ROOT
from scanwatch import ids
from scanwatch.devstack import Ports, Stack, StackConfig
from scanwatch.kafka_local import free_port
from scanwatch.peers import storescu
from scanwatch.sample import build_mr_study

pytestmark = pytest.mark.e2e

MODELS = ROOT / "var" / "models"
QUIET_PERIOD_S = 2.0


WORKERS = 2  # two worker processes share the partitions, as in a scaled-out deployment


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free (the two workers' web ports)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    ports.worker_web = free_port_pair()
    config = StackConfig(
        var=tmp_path_factory.mktemp("stack"),
        ports=ports,
        workers=WORKERS,
        quiet_period_s=QUIET_PERIOD_S,
        models=MODELS,
        kafka_libs=KAFKA_LIBS,
    )
    running = Stack(config)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def wait_for(condition, timeout: float, interval: float = 0.2):
    """Poll ``condition`` until it returns something truthy; return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")


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
        bundle = httpx.get(f"{fhir}/Observation", params={"patient": patient}).json()
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
        c["valueQuantity"]["value"] for c in obs["component"] if "valueQuantity" in c
    ]
    assert len(probabilities) == 4  # normal, mass, bleed, infarct
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert obs["valueQuantity"]["value"] == pytest.approx(1 - probabilities[0], abs=1e-3)

    device = httpx.get(f"{fhir}/Device/{ids.device_id(model_name, 1)}").json()
    assert device["version"][0]["value"] == "1"
    study = httpx.get(f"{fhir}/ImagingStudy/{ids.imaging_study_id(study_uid)}").json()
    assert study["numberOfInstances"] == len(files)
    stored = list((stack.config.var / "store").rglob("*.dcm"))
    assert len(stored) == len(files)


def observations_of(stack: Stack, patient_id: str) -> dict:
    patient = ids.patient_id(None, patient_id)
    return httpx.get(f"{stack.config.fhir_base}/Observation", params={"patient": patient}).json()


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
