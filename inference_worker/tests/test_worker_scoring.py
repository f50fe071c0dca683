"""The scoring core on real DICOM files, with a fake model and a fake FHIR writer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference_worker.ports import Prediction
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
    """Keeps what :meth:`put_all` wrote in ``resources``, and what :meth:`put_missing` would
    write in ``registered`` (a fresh store: nothing is there yet)."""

    def __init__(self) -> None:
        self.resources: list[dict] = []
        self.registered: list[dict] = []

    async def put_all(self, resources: list[dict]) -> None:
        self.resources.extend(resources)

    async def put_missing(self, resources: list[dict]) -> None:
        self.registered.extend(resources)


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
        "DiagnosticReport",
        "Provenance",
    ]
    assert model.seen[0].shape == (6, 32, 32, 3)
    assert result.predicted_class == "mass"
    assert result.anomaly_score == pytest.approx(0.9)
    assert result.model_version == 3 and result.slice_count == 6
    obs = writer.resources[3]
    assert (
        obs["id"]
        == result.observation_id
        == ids.observation_id(ready.StudyInstanceUID, "fake-model", 3)
    )
    assert obs["subject"]["reference"] == f"Patient/{ids.patient_id(None, 'P-UNIT')}"
    # While the model worked, the study was recorded as received: the same Patient, and the
    # same ImagingStudy with status "registered" until the scored one replaces it.
    patient, registered = writer.registered
    assert patient == writer.resources[0]
    assert registered == writer.resources[2] | {"status": "registered"}
    assert writer.resources[2]["status"] == "available"
    # Same ready event again: byte-identical resources, so the FHIR store adds no version.
    _, _, again, _ = asyncio.run(_score(ready))
    assert again.resources == writer.resources


def test_a_study_the_model_could_not_score_stays_recorded_as_received(study):
    import asyncio

    from inference_worker.errors import ModelUnavailable

    class DownModel(FakeModel):
        async def predict(self, images):
            raise ModelUnavailable("model server unreachable")

    writer = ListWriter()
    scorer = Scorer(DownModel(), writer, max_slices=6, retries=0)
    with pytest.raises(ModelUnavailable):
        asyncio.run(scorer.score(ready_for(study)))
    assert writer.resources == []  # no result
    assert [(r["resourceType"], r.get("status")) for r in writer.registered] == [
        ("Patient", None),
        ("ImagingStudy", "registered"),
    ]


def enhanced_mr(study: list[Path], path: Path, reverse_frames: bool = True) -> Path:
    """One Enhanced MR Image Storage instance holding ``study``'s slices as frames, with
    positions and rescale in the functional groups (frames stored in reverse order)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    slices = [pydicom.dcmread(p) for p in study]
    if reverse_frames:
        slices = slices[::-1]
    first = slices[0]
    ds = Dataset()
    for keyword in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        setattr(ds, keyword, getattr(first, keyword))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.NumberOfFrames = len(slices)
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(first.ImageOrientationPatient)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -100  # differs from the slices'
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for s in slices:
        position = Dataset()
        position.ImagePositionPatient = list(s.ImagePositionPatient)
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_mr_frames_are_ordered_and_rescaled_per_functional_groups(study, tmp_path):
    path = enhanced_mr(study, tmp_path / "enhanced.dcm")
    selected = select_series(refs_for([path]), image_size=32, max_slices=3)
    assert selected.images.shape == (3, 32, 32, 3)
    # Frames were stored top to bottom; the first image scored is still the lowest slice.
    datasets = sorted((pydicom.dcmread(p) for p in study), key=lambda d: d.ImagePositionPatient[2])
    expected = preprocess_slice(datasets[0].pixel_array, 32, 2.0, -100.0)
    np.testing.assert_array_equal(selected.images[0], expected)


def test_selection_rules_prefer_the_described_series(study, tmp_path):
    from inference_worker.series import SelectionRules

    other = []
    for n, source in enumerate(study[:5]):  # a shorter series described as FLAIR
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.99"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.99.{n}"
        ds.SeriesDescription = "AX FLAIR"
        ds.save_as(tmp_path / f"flair{n}.dcm")
        other.append(tmp_path / f"flair{n}.dcm")
    refs = refs_for(study + other)
    longest = select_series(refs, 32, 4)
    assert longest.SeriesInstanceUID != pydicom.dcmread(other[0]).SeriesInstanceUID
    flair = select_series(refs, 32, 4, SelectionRules(description_pattern="flair"))
    assert flair.SeriesInstanceUID == pydicom.dcmread(other[0]).SeriesInstanceUID
    with pytest.raises(UnusableStudy, match="selection rules"):
        select_series(refs, 32, 4, SelectionRules(orientation="sagittal"))
    with pytest.raises(UnusableStudy, match="selection rules"):
        select_series(refs, 32, 4, SelectionRules(min_slices=50))
