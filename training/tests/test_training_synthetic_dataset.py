"""The MNI152 synthetic benchmark: classes, determinism, subject split, planted anomalies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scanwatch.sample import mni152_volume
from training.dataset import LabelledImages
from training.synthetic_dataset import (
    CLASS_NAMES,
    TINY,
    BenchmarkConfig,
    build_benchmark,
    cache_path,
    load_or_build,
    plant_bleed,
    plant_infarct,
    plant_mass,
)

SMALL = replace(TINY, image_size=48, train_subjects=3, val_subjects=1, test_subjects=1)


@pytest.fixture(scope="module")
def small() -> LabelledImages:
    return build_benchmark(SMALL)


@pytest.fixture(scope="module")
def axial() -> np.ndarray:
    volume, _ = mni152_volume()
    return volume[:, :, volume.shape[2] // 2].astype(np.float64)


def test_classes_and_shapes(small: LabelledImages) -> None:
    assert small.class_names == ("normal", "mass", "bleed", "infarct") == CLASS_NAMES
    assert small.train.images.shape == (3 * SMALL.slices_per_subject, 48, 48, 1)
    assert small.train.images.dtype == np.float32
    assert 0.0 <= small.train.images.min() and small.train.images.max() <= 255.0
    assert small.image_size == 48
    # Every subject carries every class equally often.
    assert small.train.counts(4) == [6, 6, 6, 6]
    assert small.test.counts(4) == [2, 2, 2, 2]


def test_split_by_subject_without_leakage(small: LabelledImages) -> None:
    groups = {name: set(getattr(small, name).groups) for name in ("train", "val", "test")}
    assert len(groups["train"]) == 3 and len(groups["val"]) == 1 and len(groups["test"]) == 1
    assert not (
        groups["train"] & groups["val"]
        or groups["train"] & groups["test"]
        or groups["val"] & groups["test"]
    )


def test_same_seed_same_pixels_other_seed_other_pixels(small: LabelledImages) -> None:
    assert build_benchmark(SMALL).fingerprint() == small.fingerprint()
    assert build_benchmark(replace(SMALL, seed=SMALL.seed + 1)).fingerprint() != small.fingerprint()


def test_subjects_differ(small: LabelledImages) -> None:
    first = small.train.images[small.train.groups == small.train.groups[0]]
    other = small.train.images[small.train.groups != small.train.groups[0]]
    assert not np.allclose(first[0], other[0])


@pytest.mark.parametrize("planter", [plant_mass, plant_bleed, plant_infarct])
def test_planted_anomaly_is_local_and_visible(planter, axial: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    planted = planter(axial, rng, float(np.percentile(axial[axial > 0.3], 75)))
    changed = np.abs(planted - axial) > 0.1
    assert 20 < changed.sum() < 0.2 * (axial > 0.3).sum()  # a lesion, not the whole brain


def test_bleed_is_bright_and_infarct_dark(axial: np.ndarray) -> None:
    reference = float(np.percentile(axial[axial > 0.3], 75))
    bleed = plant_bleed(axial, np.random.default_rng(1), reference) - axial
    infarct = plant_infarct(axial, np.random.default_rng(1), reference) - axial
    assert bleed.max() > 0.2 and bleed.min() > -0.2
    assert infarct.min() < -0.2 and infarct.max() < 0.2


def test_cache_round_trip(tmp_path: Path, small: LabelledImages) -> None:
    loaded = load_or_build(SMALL, tmp_path)
    assert cache_path(SMALL, tmp_path).is_file()
    assert loaded.fingerprint() == small.fingerprint()
    assert LabelledImages.load(cache_path(SMALL, tmp_path)).fingerprint() == small.fingerprint()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"test_subjects": 0}, "at least one subject"),
        ({"slices_per_subject": 3}, ">= 4"),
        ({"image_size": 16}, ">= 32"),
    ],
)
def test_bad_config_is_refused(changes: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        BenchmarkConfig(**changes)
