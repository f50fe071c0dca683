"""The scoring core on real DICOM files, with a fake model and a fake FHIR writer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference_worker.model_client import Prediction
from inference_worker.scoring import Scorer
from inference_worker.series import UnusableStudy, evenly_spaced, select_series
from scanwatch import ids
from scanwatch.imaging import preprocess_slice
from scanwatch.sample import build_mr_study
from schemas import InstanceRef, StudyReadyV1

CLASSES = ["normal", "mass", "bleed", "infarct"]


def refs_for(files: list[Path]) -> list[InstanceRef]:
    refs = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append(
            InstanceRef(
                SeriesInstanceUID=ds.SeriesInstanceUID,
                SOPInstanceUID=ds.SOPInstanceUID,
                SOPClassUID=ds.SOPClassUID,
                storage_uri=path.resolve().as_uri(),
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        )
    return refs


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return build_mr_study(tmp_path_factory.mktemp("mr"), patient_id="P-UNIT", n_slices=12)


class FakeModel:
    image_size = 32

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    async def check_signature(self) -> int:
        return self.image_size

    async def predict(self, images: np.ndarray) -> Prediction:
        self.seen.append(images)
        n = len(images)
        probabilities = np.tile(np.array([0.1, 0.6, 0.2, 0.1], np.float32), (n, 1))
        return Prediction(probabilities, CLASSES, 0.5, "fake-model", 3)


class ListWriter:
    def __init__(self) -> None:
        self.resources: list[dict] = []

    async def put_all(self, resources: list[dict]) -> None:
        self.resources.extend(resources)


def test_evenly_spaced_covers_the_series():
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    assert evenly_spaced(10, 3) == [0, 4, 9]
    assert evenly_spaced(10, 1) == [5]


def test_selection_orders_slices_and_preprocesses_like_training(study):
    refs = refs_for(study)
    selected = select_series(list(reversed(refs)), image_size=32, max_slices=4)
    assert selected.images.shape == (4, 32, 32, 3)
    assert selected.number_of_instances == 12
    # The first chosen image is the lowest slice, preprocessed by the shared function.
    datasets = [pydicom.dcmread(p) for p in study]
    lowest = min(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    expected = preprocess_slice(
        lowest.pixel_array, 32, float(lowest.RescaleSlope), float(lowest.RescaleIntercept)
    )
    np.testing.assert_array_equal(selected.images[0], expected)


def test_study_without_mr_is_unusable(tmp_path, study):
    ds = pydicom.dcmread(study[0])
    ds.Modality = "CT"
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    with pytest.raises(UnusableStudy, match="no MR series"):
        select_series(refs_for([path]), image_size=32, max_slices=4)


def test_missing_file_is_unusable(tmp_path, study):
    [ref] = refs_for(study[:1])
    gone = ref.model_copy(update={"storage_uri": (tmp_path / "gone.dcm").as_uri()})
    with pytest.raises(UnusableStudy, match="cannot read"):
        select_series([gone], image_size=32, max_slices=4)


def ready_for(study) -> StudyReadyV1:
    refs = refs_for(study)
    return StudyReadyV1(
        StudyInstanceUID=pydicom.dcmread(study[0]).StudyInstanceUID,
        instances=refs,
        first_received_at="2026-01-01T00:00:00Z",
        last_received_at="2026-01-01T00:00:01Z",
        quiet_period_s=1,
    )


async def _score(ready):
    model, writer = FakeModel(), ListWriter()
    result = await Scorer(model, writer, max_slices=6, retries=0).score(ready)
    return ready, model, writer, result


def test_score_writes_fhir_and_returns_a_consistent_result(study):
    import asyncio

    ready = ready_for(study)
    ready, model, writer, result = asyncio.run(_score(ready))
    assert [r["resourceType"] for r in writer.resources] == [
        "Patient",
        "Device",
        "ImagingStudy",
        "Observation",
    ]
    assert model.seen[0].shape == (6, 32, 32, 3)
    assert result.predicted_class == "mass"
    assert result.anomaly_score == pytest.approx(0.9)
    assert result.model_version == 3 and result.slice_count == 6
    obs = writer.resources[-1]
    assert (
        obs["id"]
        == result.observation_id
        == ids.observation_id(ready.StudyInstanceUID, "fake-model", 3)
    )
    assert obs["subject"]["reference"] == f"Patient/{ids.patient_id(None, 'P-UNIT')}"
    # Same ready event again: byte-identical resources, so the FHIR store adds no version.
    _, _, again, _ = asyncio.run(_score(ready))
    assert again.resources == writer.resources
