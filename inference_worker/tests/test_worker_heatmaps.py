"""The worker's heatmaps: computed for every scored study, stored beside it as DICOM Secondary
Capture (highdicom), deterministic, referenced from FHIR; a redelivery duplicates nothing and a
heatmap failure leaves the score standing. Real DICOM files in the listener's store layout, a
fake model and a fake FHIR writer."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest

from inference_worker import heatmaps
from inference_worker.errors import ModelUnavailable, SaliencyUnavailable
from inference_worker.metrics import WorkerMetrics
from inference_worker.ports import Prediction, Saliency
from inference_worker.scoring import Scorer
from scanwatch import store_layout
from scanwatch.imaging import square_resize
from scanwatch.sample import build_mr_study
from schemas import InstanceRef, StudyReadyV1

CLASSES = ["normal", "mass", "bleed", "infarct"]
SIZE = 32
SLICES = 6


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A sample MR study copied into the file store's layout: (store root, instance paths)."""
    root = tmp_path / "store"
    paths = []
    for source in build_mr_study(tmp_path / "sent", patient_id="P-HEAT", n_slices=SLICES):
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        target = store_layout.instance_path(
            root, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        paths.append(target)
    return root, paths


def ready_for(paths: list[Path]) -> StudyReadyV1:
    refs = []
    for path in paths:
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
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return StudyReadyV1(
        StudyInstanceUID=study,
        instances=refs,
        first_received_at=datetime(2026, 1, 2, 3, 4, 0, tzinfo=UTC),
        last_received_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        quiet_period_s=5.0,
        occurred_at=datetime(2026, 1, 2, 3, 4, 10, tzinfo=UTC),
    )


def slice_probabilities(n: int) -> np.ndarray:
    """A different answer per slice, so per-slice values can be told apart."""
    rows = np.array([[0.7 - 0.1 * i, 0.1 + 0.1 * i, 0.1, 0.1] for i in range(n)], np.float32)
    return rows / rows.sum(axis=1, keepdims=True)


class ExplainingModel:
    """Scores and explains; ``explain_error`` makes the saliency call fail."""

    image_size = SIZE

    def __init__(self, explain_error: Exception | None = None) -> None:
        self.explain_error = explain_error
        self.explained = 0

    async def check_signature(self) -> int:
        return SIZE

    async def predict(self, images: np.ndarray) -> Prediction:
        return Prediction(slice_probabilities(len(images)), CLASSES, 0.5, "fake-model", 3)

    async def explain(self, images: np.ndarray, model_version: int) -> Saliency:
        assert model_version == 3  # the version that scored them
        self.explained += 1
        if self.explain_error is not None:
            raise self.explain_error
        # A hot spot in each image's top-left quarter, of a different strength per slice.
        maps = np.zeros((len(images), SIZE, SIZE), np.float32)
        for i in range(len(images)):
            maps[i, 4:12, 4:12] = 1.0 - 0.1 * i
        return Saliency(maps, slice_probabilities(len(images)), CLASSES, "fake-model", 3)


class ListWriter:
    def __init__(self) -> None:
        self.writes: list[list[dict]] = []

    async def put_all(self, resources: list[dict]) -> None:
        self.writes.append(resources)

    async def put_missing(self, resources: list[dict]) -> None:
        pass


def score(model: ExplainingModel, ready: StudyReadyV1) -> tuple[ListWriter, WorkerMetrics]:
    writer, metrics = ListWriter(), WorkerMetrics()
    scorer = Scorer(model, writer, retries=0, metrics=metrics)
    asyncio.run(scorer.score(ready))
    return writer, metrics


def of_type(resources: list[dict], kind: str) -> dict:
    return next(r for r in resources if r["resourceType"] == kind)


def heatmap_files(root: Path, study: str) -> list[Path]:
    return sorted(
        p
        for p in (root / study).rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == heatmaps.SECONDARY_CAPTURE
    )


def outcome(metrics: WorkerMetrics, name: str) -> float:
    return (
        metrics.registry.get_sample_value("scanwatch_worker_heatmaps_total", {"outcome": name})
        or 0.0
    )


def test_every_scored_slice_gets_a_stored_heatmap_referenced_from_fhir(store) -> None:
    root, paths = store
    ready = ready_for(paths)
    writer, metrics = score(ExplainingModel(), ready)

    files = heatmap_files(root, ready.StudyInstanceUID)
    assert len(files) == SLICES and outcome(metrics, "written") == 1
    series_uid = heatmaps.heatmap_series_uid(ready.StudyInstanceUID, "fake-model", 3)
    assert {p.parent.name for p in files} == {series_uid}
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in paths}
    referenced = []
    for path in files:
        ds = pydicom.dcmread(path)
        image = highdicom.Image.from_dataset(ds)  # highdicom reads it back
        assert image.SOPClassUID == heatmaps.SECONDARY_CAPTURE
        assert ds.StudyInstanceUID == ready.StudyInstanceUID
        assert ds.PatientID == "P-HEAT"
        source_header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        for keyword in ("StudyDescription", "StudyDate", "AccessionNumber"):
            assert ds.get(keyword) == source_header.get(keyword), keyword  # the study's own
        assert store_layout.parse_file_name(path.name) == (ds.SOPInstanceUID, 1)
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        referenced.append(source.SOPInstanceUID)
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)  # overlays pixel for pixel
        index = int(ds.InstanceNumber) - 1  # the scored slices' order
        assert ds.pixel_array.dtype == np.uint8
        assert abs(int(ds.pixel_array.max()) - 255 * (1.0 - 0.1 * index)) <= 1
        row = slice_probabilities(SLICES)[index]
        values = heatmaps.slice_probabilities(ds)
        assert list(values) == CLASSES
        np.testing.assert_allclose(list(values.values()), row, atol=1e-6)
        assert "not reviewed" in ds.ImageComments
    assert len(set(referenced)) == SLICES

    # The score was written first, without heatmaps; then the resources that list them.
    assert len(writer.writes) == 2
    first, last = (of_type(w, "ImagingStudy") for w in writer.writes)
    assert [s["uid"] for s in first["series"]] == [str(sources[referenced[0]].SeriesInstanceUID)]
    listed = last["series"][1]
    assert listed["uid"] == series_uid and listed["modality"]["code"] == "OT"
    stored = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert {i["uid"] for i in listed["instance"]} == stored
    observation = of_type(writer.writes[-1], "Observation")
    assert observation["derivedFrom"] == [{"reference": f"ImagingStudy/{last['id']}"}]
    assert of_type(writer.writes[0], "Observation") == observation  # the score did not change


def test_a_redelivered_study_writes_no_file_and_no_new_fhir_version(store) -> None:
    root, paths = store
    ready = ready_for(paths)
    first_writer, _ = score(ExplainingModel(), ready)
    files = heatmap_files(root, ready.StudyInstanceUID)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}

    model = ExplainingModel()
    writer, metrics = score(model, ready)

    assert heatmap_files(root, ready.StudyInstanceUID) == files
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamps
    assert model.explained == 0 and outcome(metrics, "present") == 1
    # One write, byte for byte the first delivery's last: the FHIR API stores no new version.
    assert writer.writes == [first_writer.writes[-1]]


def test_the_same_study_gives_the_same_uids_and_pixels(store, tmp_path: Path) -> None:
    root, paths = store
    ready = ready_for(paths)
    score(ExplainingModel(), ready)
    first = {p.name: p.read_bytes() for p in heatmap_files(root, ready.StudyInstanceUID)}
    for path in heatmap_files(root, ready.StudyInstanceUID):
        path.unlink()
    score(ExplainingModel(), ready)
    again = {p.name: p.read_bytes() for p in heatmap_files(root, ready.StudyInstanceUID)}
    assert again == first


@pytest.mark.parametrize(
    ("error", "name"),
    [(ModelUnavailable("down"), "failed"), (SaliencyUnavailable("old model"), "unavailable")],
)
def test_a_heatmap_failure_leaves_the_score_written(store, error: Exception, name: str) -> None:
    root, paths = store
    ready = ready_for(paths)
    writer, metrics = score(ExplainingModel(explain_error=error), ready)

    assert outcome(metrics, name) == 1
    assert heatmap_files(root, ready.StudyInstanceUID) == []
    assert len(writer.writes) == 1  # the score, with its Observation
    assert of_type(writer.writes[0], "Observation")["valueQuantity"]["value"] > 0
    assert len(of_type(writer.writes[0], "ImagingStudy")["series"]) == 1


@pytest.mark.parametrize(
    ("cosines", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),  # axial
        ([0, 1, 0, 0, 0, -1], ("P", "F")),  # sagittal
        ([1, 0, 0, 0, 0, -1], ("L", "F")),  # coronal
        ([-0.9, 0.1, 0, 0.1, 0.2, -0.97], ("R", "F")),  # oblique: the dominant axis
    ],
)
def test_the_heatmap_keeps_the_slices_patient_orientation(cosines, expected) -> None:
    ds = pydicom.Dataset()
    ds.ImageOrientationPatient = cosines
    assert heatmaps.patient_orientation(ds) == expected


def test_heatmaps_can_be_turned_off(store) -> None:
    root, paths = store
    ready = ready_for(paths)
    model, writer = ExplainingModel(), ListWriter()
    scorer = Scorer(model, writer, retries=0, heatmaps=False)
    asyncio.run(scorer.score(ready))
    assert model.explained == 0 and len(writer.writes) == 1
    assert heatmap_files(root, ready.StudyInstanceUID) == []


def test_a_heatmap_is_mapped_back_onto_the_source_slice() -> None:
    """The inverse of the preprocessing's pad-to-square and resize: a spot in the model's input
    lands on the same spot of the (non-square) source slice."""
    source = np.zeros((60, 40), np.float32)
    source[10:20, 25:35] = 1.0
    model_input = square_resize(source, SIZE)
    back = heatmaps.to_source_geometry(model_input, 60, 40)
    assert back.shape == (60, 40)
    assert back[12:18, 27:33].min() > 0.8
    assert back[40:, :].max() < 0.05 and back[:, :15].max() < 0.05
