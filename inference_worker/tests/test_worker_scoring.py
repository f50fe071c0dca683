"""The scoring core on real DICOM files, with a fake model and a fake FHIR writer."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference_worker.ports import Prediction
from inference_worker.scoring import Scorer
from inference_worker.series import Frame, UnusableStudy, select_series, slices_to_score
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


def frames(
    positions: list[float], thickness: float | None = 1.0, located: bool = True
) -> list[Frame]:
    """Single-frame images at ``positions`` (mm along the normal), in a shuffled order."""
    ref = InstanceRef(
        SeriesInstanceUID="1.2.3",
        SOPInstanceUID="1.2.3.0",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
        storage_uri="file:///none.dcm",
        sha256="0" * 64,
    )
    made = [
        Frame(ref.model_copy(update={"SOPInstanceUID": f"1.2.3.{n}"}), None, z, 1, 0)
        for n, z in enumerate(positions)
    ]
    made = [dataclasses.replace(f, located=located, thickness=thickness) for f in made]
    return made[::2] + made[1::2]


def positions(chosen: list[Frame]) -> list[float]:
    return [f.position for f in chosen]


def test_every_slice_is_scored_by_default_in_order_along_the_normal():
    series = frames([float(z) for z in range(40)])
    assert positions(slices_to_score(series)) == [float(z) for z in range(40)]


def test_a_max_gap_leaves_no_wider_unscanned_gap_between_scored_slices():
    series = frames([z * 1.0 for z in range(11)], thickness=1.0)  # contiguous 1 mm slices
    # 0 mm: contiguous slices cannot be skipped
    assert positions(slices_to_score(series, 0.0)) == [z * 1.0 for z in range(11)]
    # 2 mm: every third slice (centres 3 mm apart, 2 mm unscanned between them)
    assert positions(slices_to_score(series, 2.0)) == [0.0, 3.0, 6.0, 9.0, 10.0]
    # Overlapping 1 mm slices every 0.5 mm: with 0 mm, every other one is enough.
    overlapping = frames([z * 0.5 for z in range(9)], thickness=1.0)
    assert positions(slices_to_score(overlapping, 0.0)) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_uneven_spacing_and_real_gaps_in_the_volume():
    series = frames([0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 12.5, 20.0], thickness=None)
    # No thickness in the header: the gap is the distance of the centres.
    chosen = positions(slices_to_score(series, 2.0))
    assert chosen == [0.0, 2.0, 10.0, 12.0, 12.5, 20.0]
    gaps = np.diff(chosen)
    # Wider gaps only where the series itself has them (2 -> 10 and 12.5 -> 20).
    assert all(
        g <= 2.0 or (a, b) in ((2.0, 10.0), (12.5, 20.0))
        for a, b, g in zip(chosen, chosen[1:], gaps, strict=False)
    )


def test_duplicates_at_one_position_are_scored_once_under_a_gap_rule():
    series = frames([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], thickness=1.0)
    chosen = slices_to_score(series, 0.0)
    assert positions(chosen) == [0.0, 1.0, 2.0]
    # Every slice means every image, duplicates included, in a fixed order.
    assert len(slices_to_score(series)) == 6
    assert slices_to_score(series) == slices_to_score(list(reversed(series)))


def test_positions_unknown_means_every_slice():
    series = frames([float(z) for z in range(10)], located=False)
    assert len(slices_to_score(series, 5.0)) == 10


def test_a_negative_max_gap_is_refused_at_start_up():
    from inference_worker.config import Settings
    from inference_worker.series import SelectionRules

    with pytest.raises(ValueError, match="max_gap_mm"):
        SelectionRules(max_gap_mm=-1.0)
    with pytest.raises(ValueError, match="max_gap_mm"):
        Settings(max_gap_mm=-1.0)
    assert Settings().selection_rules().max_gap_mm is None
    assert Settings(max_gap_mm=2.5).selection_rules().max_gap_mm == 2.5


def test_selection_orders_slices_and_preprocesses_like_training(study):
    refs = refs_for(study)
    selected = select_series(list(reversed(refs)), image_size=32)
    assert selected.images.shape == (12, 32, 32, 3)
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
        select_series(refs_for([path]), image_size=32)


def test_missing_file_is_unusable(tmp_path, study):
    [ref] = refs_for(study[:1])
    gone = ref.model_copy(update={"storage_uri": (tmp_path / "gone.dcm").as_uri()})
    with pytest.raises(UnusableStudy, match="cannot read"):
        select_series([gone], image_size=32)


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
    result = await Scorer(model, writer, retries=0).score(ready)
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
    assert model.seen[0].shape == (12, 32, 32, 3)  # the whole series
    assert result.predicted_class == "mass"
    assert result.anomaly_score == pytest.approx(0.9)
    assert result.model_version == 3 and result.slice_count == 12
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


def test_the_study_is_scored_by_the_model_s_rule_and_keeps_its_strongest_slice(study):
    """A finding on one slice of twelve: the mean averages it away, the model's max rule keeps
    it, and the Observation names the slice it lies on."""
    import asyncio

    from scanwatch.study_score import StudyRule

    class FocalModel(FakeModel):
        rule: StudyRule | None = None

        async def predict(self, images: np.ndarray) -> Prediction:
            probabilities = np.tile(np.array([0.97, 0.01, 0.01, 0.01], np.float32), (12, 1))
            probabilities[7] = [0.1, 0.1, 0.7, 0.1]  # the seventh slice from the bottom
            if self.rule is None:
                return Prediction(probabilities, CLASSES, 0.5, "fake-model", 3)
            return Prediction(probabilities, CLASSES, 0.5, "fake-model", 3, self.rule)

    def run(rule: StudyRule | None):
        model, writer = FocalModel(), ListWriter()
        model.rule = rule
        result = asyncio.run(Scorer(model, writer, retries=0).score(ready_for(study)))
        return result, writer.resources[3]

    mean, mean_obs = run(None)
    assert mean.anomaly_score == pytest.approx((11 * 0.03 + 0.9) / 12, abs=1e-6)
    assert mean_obs["interpretation"][0]["coding"][0]["code"] == "N"
    peak, obs = run(StudyRule("max"))
    assert peak.anomaly_score == pytest.approx(0.9, abs=1e-6)
    assert peak.predicted_class == "bleed"
    assert obs["interpretation"][0]["coding"][0]["code"] == "A"
    components = {c["code"]["coding"][0]["code"]: c for c in obs["component"]}
    assert components["study-rule"]["valueString"] == "max"
    assert components["strongest-slice-anomaly-score"]["valueQuantity"]["value"] == (
        pytest.approx(0.9, abs=1e-6)
    )
    seventh = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in study),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )[7]
    assert components["strongest-slice"]["valueString"] == seventh.SOPInstanceUID
    assert "strongest-slice-frame" not in components  # single-frame instances
    assert mean_obs["component"][-3]["valueString"] == "mean"  # a model without a rule


def test_a_study_the_model_could_not_score_stays_recorded_as_received(study):
    import asyncio

    from inference_worker.errors import ModelUnavailable

    class DownModel(FakeModel):
        async def predict(self, images):
            raise ModelUnavailable("model server unreachable")

    writer = ListWriter()
    scorer = Scorer(DownModel(), writer, retries=0)
    with pytest.raises(ModelUnavailable):
        asyncio.run(scorer.score(ready_for(study)))
    assert writer.resources == []  # no result
    assert [(r["resourceType"], r.get("status")) for r in writer.registered] == [
        ("Patient", None),
        ("ImagingStudy", "registered"),
    ]


def test_a_study_that_arrives_while_the_model_server_is_down_is_recorded_as_received(study):
    """Before its first answer the worker does not know the model's input size; the study is
    still recorded as received (that needs only the headers) before the worker gives up."""
    import asyncio

    from inference_worker.errors import ModelUnavailable

    class NeverAnswered(FakeModel):
        image_size = None  # type: ignore[assignment]

        async def check_signature(self) -> int:
            raise ModelUnavailable("model server unreachable")

    writer = ListWriter()
    with pytest.raises(ModelUnavailable):
        asyncio.run(Scorer(NeverAnswered(), writer, retries=0).score(ready_for(study)))
    assert writer.resources == []
    assert [(r["resourceType"], r.get("status")) for r in writer.registered] == [
        ("Patient", None),
        ("ImagingStudy", "registered"),
    ]


def enhanced_mr(
    study: list[Path], path: Path, reverse_frames: bool = True, thickness: float | None = None
) -> Path:
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
    if thickness is not None:
        measures = Dataset()
        measures.SliceThickness = thickness
        shared.PixelMeasuresSequence = Sequence([measures])
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
    selected = select_series(refs_for([path]), image_size=32)
    assert selected.images.shape == (12, 32, 32, 3)
    assert [s.frame for s in selected.slices] == list(range(11, -1, -1))
    # Frames were stored top to bottom; the first image scored is still the lowest slice.
    datasets = sorted((pydicom.dcmread(p) for p in study), key=lambda d: d.ImagePositionPatient[2])
    expected = preprocess_slice(datasets[0].pixel_array, 32, 2.0, -100.0)
    np.testing.assert_array_equal(selected.images[0], expected)


def test_multi_frame_slices_are_chosen_by_their_functional_groups_thickness(study, tmp_path):
    from inference_worker.series import SelectionRules

    # Frames 11.91 mm apart, each 24 mm thick (Pixel Measures): every other one covers the
    # volume without a gap; the last is always scored.
    path = enhanced_mr(study, tmp_path / "thick.dcm", thickness=24.0)
    selected = select_series(refs_for([path]), 32, SelectionRules(max_gap_mm=0.0))
    assert [s.frame for s in selected.slices] == [11, 9, 7, 5, 3, 1, 0]
    assert len(select_series(refs_for([path]), 32).slices) == 12  # no gap rule: all


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
    longest = select_series(refs, 32)
    assert longest.SeriesInstanceUID != pydicom.dcmread(other[0]).SeriesInstanceUID
    flair = select_series(refs, 32, SelectionRules(description_pattern="flair"))
    assert flair.SeriesInstanceUID == pydicom.dcmread(other[0]).SeriesInstanceUID
    with pytest.raises(UnusableStudy, match="selection rules"):
        select_series(refs, 32, SelectionRules(orientation="sagittal"))
    with pytest.raises(UnusableStudy, match="selection rules"):
        select_series(refs, 32, SelectionRules(min_slices=50))
