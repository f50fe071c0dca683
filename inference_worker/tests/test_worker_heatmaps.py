"""The worker's heatmaps: computed for every scored study, stored beside it as DICOM Secondary
Capture (highdicom), deterministic, referenced from FHIR; a redelivery duplicates nothing and a
heatmap failure leaves the score standing. Real DICOM files in the listener's store layout, a
fake model and a fake FHIR writer."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from inference_worker import heatmaps
from inference_worker.errors import ModelUnavailable, SaliencyUnavailable
from inference_worker.metrics import WorkerMetrics
from inference_worker.ports import Prediction, Saliency
from inference_worker.scoring import Scorer
from inference_worker.series import SourceSlice
from scanwatch import dicom_scan, store_layout
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


def hot_spots(n: int) -> np.ndarray:
    """A hot spot in each image's top-left quarter, of a different strength per slice."""
    maps = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        maps[i, 4:12, 4:12] = 1.0 - 0.1 * i
    return maps


class ExplainingModel:
    """Scores and explains; ``explain_error`` makes the saliency call fail; ``one_pass``: its
    Predict returns the heatmaps with the score (``serving_default``'s optional output)."""

    image_size = SIZE

    def __init__(self, explain_error: Exception | None = None, one_pass: bool = False) -> None:
        self.explain_error = explain_error
        self.one_pass = one_pass
        self.explained = 0

    async def check_signature(self) -> int:
        return SIZE

    async def predict(self, images: np.ndarray) -> Prediction:
        maps = hot_spots(len(images)) if self.one_pass else None
        probabilities = slice_probabilities(len(images))
        return Prediction(probabilities, CLASSES, 0.5, "fake-model", 3, heatmaps=maps)

    async def explain(self, images: np.ndarray, model_version: int) -> Saliency:
        assert model_version == 3  # the version that scored them
        self.explained += 1
        if self.explain_error is not None:
            raise self.explain_error
        return Saliency(
            hot_spots(len(images)), slice_probabilities(len(images)), CLASSES, "fake-model", 3
        )


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


@pytest.mark.parametrize("one_pass", [False, True], ids=["saliency Predict", "one pass"])
def test_every_scored_slice_gets_a_stored_heatmap_referenced_from_fhir(store, one_pass) -> None:
    """The same series whether the heatmaps came from the saliency signature or with the
    score; in the second case the model is not asked again."""
    root, paths = store
    ready = ready_for(paths)
    model = ExplainingModel(one_pass=one_pass)
    writer, metrics = score(model, ready)

    assert model.explained == (0 if one_pass else 1)
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


# --- The series is built from one highdicom instance per template group -------------------

CREATED = datetime(2026, 1, 2, 3, 4, 10, 123456, tzinfo=UTC)


def highdicom_bytes(
    path: Path, frame: int | None, heatmap: np.ndarray, series_uid: str, number: int, row
) -> bytes:
    """What highdicom builds for one slice (heatmaps.build_instance), as pydicom writes it."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    image = heatmaps.build_instance(
        header, frame, heatmap, series_uid, number, CLASSES, [float(p) for p in row],
        "fake-model", 3, CREATED,
    )  # fmt: skip
    buffer = BytesIO()
    image.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def varied_probabilities(n: int) -> np.ndarray:
    """Per slice, another most probable class (explained class names of odd and even length)
    and values whose text differs in length."""
    rng = np.random.default_rng(7)
    rows = rng.dirichlet(np.ones(len(CLASSES)), n)
    for i in range(n):
        rows[i, i % len(CLASSES)] += 2.0
    return (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)


def assert_same_instances(root: Path, series: heatmaps.HeatmapSeries, expected: list[bytes]):
    folder = root / series.StudyInstanceUID / series.SeriesInstanceUID
    for uid, wanted in zip(series.SOPInstanceUIDs, expected, strict=True):
        stored = (folder / f"{uid}.dcm").read_bytes()
        if stored != wanted:  # say which attribute differs before comparing the bytes
            ours, theirs = pydicom.dcmread(BytesIO(stored)), pydicom.dcmread(BytesIO(wanted))
            assert ours.file_meta == theirs.file_meta
            for element in theirs:
                assert ours.get(element.tag) == element, element.keyword or element.tag
            assert set(ours.keys()) == set(theirs.keys())
        assert stored == wanted


@pytest.fixture()
def counted_highdicom(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SOP Instance UIDs of the instances highdicom builds (its constructor still runs)."""
    built: list[str] = []
    real = highdicom.sc.SCImage.from_ref_dataset

    def counting(*args, **kwargs):
        built.append(kwargs["sop_instance_uid"])
        return real(*args, **kwargs)

    monkeypatch.setattr(highdicom.sc.SCImage, "from_ref_dataset", counting)
    return built


def test_every_derived_instance_is_what_highdicom_builds(
    tmp_path: Path, counted_highdicom: list[str]
) -> None:
    """One series, one template group: highdicom builds the first instance only, and every
    other one, derived from it, is byte for byte what highdicom builds for its slice. The
    slices vary in all that a slice changes: UIDs of odd and even length, instance numbers of
    one and two digits, frames (a multi-frame source's, 1 to 12), the explained class,
    probabilities, pixels, and the acquisition time (read, then replaced by the series' time).
    """
    paths = build_mr_study(tmp_path / "sent", patient_id="P-TEMPLATE", n_slices=12)
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.AcquisitionDateTime = f"2025010610{i:02d}15.{i:03d}"
        ds.AcquisitionTime = f"10{i:02d}15"
        ds.save_as(path)
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in paths
    ]
    # The first source's frames as well (the writer takes a frame index as given).
    sources += [SourceSlice(sources[0].SOPInstanceUID, paths[0], frame) for frame in range(12)]
    maps = np.random.default_rng(3).uniform(0, 1.1, (len(sources), SIZE, SIZE)).astype(np.float32)
    rows = varied_probabilities(len(sources))
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)

    series = heatmaps.write_heatmap_series(
        tmp_path / "store", study, sources, maps, rows, CLASSES, "fake-model", 3, CREATED
    )

    assert series.written == len(sources) and len(counted_highdicom) == 1
    uid_lengths = {len(uid) % 2 for uid in series.SOPInstanceUIDs}
    assert uid_lengths == {0, 1}  # both paddings met
    expected = [
        highdicom_bytes(s.path, s.frame, maps[i], series.SeriesInstanceUID, i + 1, rows[i])
        for i, s in enumerate(sources)
    ]
    assert_same_instances(tmp_path / "store", series, expected)


def edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_slices_that_differ_in_what_the_instance_copies_get_their_own_template(
    tmp_path: Path, counted_highdicom: list[str]
) -> None:
    """A slice whose header differs in what the instance copies from it (geometry, orientation,
    spacing, equipment, character set, an unreadable acquisition time) is built by highdicom
    for its own group; the instances derived in every group are still highdicom's."""
    paths = build_mr_study(tmp_path / "sent", patient_id="P-GROUPS", n_slices=12)
    edit(paths[2], Rows=40, Columns=60, PixelData=bytes(40 * 60 * 2))
    edit(paths[3], Rows=40, Columns=60, PixelData=bytes(40 * 60 * 2))
    edit(paths[4], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])  # sagittal
    edit(paths[5], PixelSpacing=[0.5, 0.5])
    edit(paths[6], Manufacturer="Other", StationName="MR2")
    edit(paths[7], AcquisitionDateTime="not a time")
    edit(paths[8], AcquisitionDateTime=None)
    edit(paths[9], SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in paths
    ]
    maps = np.random.default_rng(5).uniform(0, 1, (len(paths), SIZE, SIZE)).astype(np.float32)
    rows = varied_probabilities(len(paths))
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)

    series = heatmaps.write_heatmap_series(
        tmp_path / "store", study, sources, maps, rows, CLASSES, "fake-model", 3, CREATED
    )

    # Groups: the 4 unchanged slices (0, 1, 10, 11), the two 40×60 ones, and one per edit.
    assert len(counted_highdicom) == 1 + 1 + 6
    expected = [
        highdicom_bytes(s.path, s.frame, maps[i], series.SeriesInstanceUID, i + 1, rows[i])
        for i, s in enumerate(sources)
    ]
    assert_same_instances(tmp_path / "store", series, expected)
    stored = pydicom.dcmread(
        tmp_path / "store" / study / series.SeriesInstanceUID / f"{series.SOPInstanceUIDs[3]}.dcm"
    )
    assert (stored.Rows, stored.Columns) == (40, 60)


def test_a_source_the_header_scan_cannot_read_is_read_by_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_highdicom: list[str]
) -> None:
    """Sources in a transfer syntax the scan does not read (compressed, big endian) are read
    with pydicom: still one template for the series, still highdicom's instances."""

    def not_scanned(*args, **kwargs):
        raise dicom_scan.Undecodable("transfer syntax not scanned")

    monkeypatch.setattr(heatmaps, "scan_file", not_scanned)
    paths = build_mr_study(tmp_path / "sent", patient_id="P-PYDICOM", n_slices=4)
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in paths
    ]
    maps = np.random.default_rng(9).uniform(0, 1, (4, SIZE, SIZE)).astype(np.float32)
    rows = varied_probabilities(4)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    series = heatmaps.write_heatmap_series(
        tmp_path / "store", study, sources, maps, rows, CLASSES, "fake-model", 3, CREATED
    )
    assert len(counted_highdicom) == 1
    expected = [
        highdicom_bytes(s.path, None, maps[i], series.SeriesInstanceUID, i + 1, rows[i])
        for i, s in enumerate(sources)
    ]
    assert_same_instances(tmp_path / "store", series, expected)


def test_instances_lost_in_a_crash_are_written_again_the_same(tmp_path: Path) -> None:
    """Renames not yet made durable when the worker died: those files are missing, the rest
    whole. The next delivery writes only the missing ones, byte for byte as before (their
    template is then built from another slice)."""
    paths = build_mr_study(tmp_path / "sent", patient_id="P-LOST", n_slices=5)
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in paths
    ]
    maps = np.random.default_rng(4).uniform(0, 1, (5, SIZE, SIZE)).astype(np.float32)
    rows = varied_probabilities(5)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    args = (study, sources, maps, rows, CLASSES, "fake-model", 3, CREATED)
    series = heatmaps.write_heatmap_series(tmp_path / "store", *args)
    folder = tmp_path / "store" / study / series.SeriesInstanceUID
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for uid in (series.SOPInstanceUIDs[0], series.SOPInstanceUIDs[3]):
        (folder / f"{uid}.dcm").unlink()
    assert heatmaps.present_series(tmp_path / "store", study, sources, "fake-model", 3) is None

    again = heatmaps.write_heatmap_series(tmp_path / "store", *args)

    assert again.written == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_template_that_no_longer_matches_highdicom_writes_nothing(
    store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template checks its own slice against highdicom's bytes: were the per-slice
    encoding to drift (here: text padded wrongly), the series is refused, not written."""
    root, paths = store
    monkeypatch.setattr(heatmaps._Template, "_text", lambda self, value: value.encode() + b"\0")
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in paths
    ]
    maps = np.zeros((SLICES, SIZE, SIZE), np.float32)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    with pytest.raises(RuntimeError, match="differs from what highdicom builds"):
        heatmaps.write_heatmap_series(
            root, study, sources, maps, slice_probabilities(SLICES), CLASSES, "m", 1, CREATED
        )
    assert heatmap_files(root, study) == []
    assert not any(p.name.startswith(".tmp-") for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("rows", "cols", "size"),
    [
        (233, 197, 128),  # the sample's slices, upsampled
        (197, 233, 128),
        (60, 40, 32),  # ndimage zeroes the last row and column here (rounding past the edge)
        (31, 31, 32),  # the same, downsampled
        (64, 64, 128),  # downsampled
        (40, 60, 32),
        (1, 1, 32),
        (2, 3, 32),
        (32, 20, 32),  # no resize: the padding cropped
        (500, 3, 128),
    ],
)
def test_the_heatmap_resize_is_ndimages_bilinear_zoom(rows: int, cols: int, size: int) -> None:
    """The vectorised mapping gives the pixel values of scipy.ndimage.zoom(order=1) then the
    crop, which the heatmaps were made with before (the float values up to rounding)."""
    maps = np.random.default_rng(rows * cols).uniform(-0.1, 1.1, (5, size, size)).astype(np.float32)
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    expected = []
    for heatmap in maps:
        square = heatmap if side == size else ndimage.zoom(heatmap, side / size, order=1)
        expected.append(square[top : top + rows, left : left + cols])
    mapped = heatmaps.to_source_geometry_stack(maps, rows, cols)
    np.testing.assert_allclose(mapped, np.stack(expected), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        heatmaps.heatmap_pixels(mapped), heatmaps.heatmap_pixels(np.stack(expected))
    )
