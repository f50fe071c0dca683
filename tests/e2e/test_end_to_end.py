"""End to end: a real MR series sent with dcmtk's storescu becomes a FHIR Observation.

Everything is real: the Kafka broker, the DICOM listener, the Faust worker, the model server
running the EfficientNet SavedModel from the model repository, and the FHIR API — each started as
its own process by the same :class:`scanwatch.devstack.Stack` that ``scanwatch run`` uses.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    config = StackConfig(
        var=tmp_path_factory.mktemp("stack"),
        ports=ports,
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
