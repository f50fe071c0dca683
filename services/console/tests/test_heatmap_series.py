"""The worker's heatmap series, stored beside a study in the listener's file store, is what a
viewer finds through the console's DICOMweb: listed with the study's series, its instances
retrievable, each slice's class probabilities in its metadata."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference_worker import heatmaps
from inference_worker.series import SourceSlice
from scanwatch.sample import build_mr_study
from services.console.tests.test_dicomweb import Served, _serve

CLASSES = ["normal", "mass", "bleed", "infarct"]
SLICES = 3


@pytest.fixture(scope="module")
def with_heatmaps(
    tmp_path_factory: pytest.TempPathFactory, signing_keys: Path
) -> Iterator[tuple[Served, heatmaps.HeatmapSeries, np.ndarray]]:
    tmp = tmp_path_factory.mktemp("console-heatmaps")
    generator = _serve(tmp, signing_keys, {"sample": build_mr_study(tmp / "s", n_slices=4)})
    served = next(generator)
    stored = served.files["sample"][:SLICES]
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in stored
    ]
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    maps = np.random.default_rng(0).uniform(0, 1, (SLICES, 32, 32)).astype(np.float32)
    study = str(pydicom.dcmread(stored[0], stop_before_pixels=True).StudyInstanceUID)
    series = heatmaps.write_heatmap_series(
        served.store.root, study, sources, maps, probabilities, CLASSES, "brain-mri-anomaly", 1,
        datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    yield served, series, probabilities
    next(generator, None)


def test_the_heatmap_series_is_listed_with_the_study(with_heatmaps) -> None:
    served, series, probabilities = with_heatmaps
    client = served.client()
    found = client.search_for_series(series.StudyInstanceUID)
    by_uid = {r["0020000E"]["Value"][0]: r for r in found}
    assert len(by_uid) == 2  # the MR series and the heatmaps
    listed = by_uid[series.SeriesInstanceUID]
    assert listed["00080060"]["Value"] == ["OT"]
    assert listed["0008103E"]["Value"] == [heatmaps.SERIES_DESCRIPTION]
    instances = client.search_for_instances(series.StudyInstanceUID, series.SeriesInstanceUID)
    assert {r["00080018"]["Value"][0] for r in instances} == set(series.SOPInstanceUIDs)


def test_its_instances_and_their_slice_probabilities_are_retrievable(with_heatmaps) -> None:
    served, series, probabilities = with_heatmaps
    client = served.client()
    for index, uid in enumerate(series.SOPInstanceUIDs):
        ds = client.retrieve_instance(series.StudyInstanceUID, series.SeriesInstanceUID, uid)
        assert ds.SOPClassUID == heatmaps.SECONDARY_CAPTURE
        values = heatmaps.slice_probabilities(ds)
        np.testing.assert_allclose(list(values.values()), probabilities[index], atol=1e-9)
        stored = pydicom.dcmread(
            served.store.root / series.StudyInstanceUID / series.SeriesInstanceUID / f"{uid}.dcm"
        )
        np.testing.assert_array_equal(ds.pixel_array, stored.pixel_array)
    # A viewer reading metadata only gets the same values (private tags included).
    metadata = client.retrieve_series_metadata(series.StudyInstanceUID, series.SeriesInstanceUID)
    first = next(m for m in metadata if m["00080018"]["Value"][0] == series.SOPInstanceUIDs[0])
    assert first["00711011"]["Value"] == pytest.approx(list(probabilities[0]))
    assert first["00711010"]["Value"] == CLASSES
