"""The study benchmark: whole studies, one lesion on adjacent slices, sizes and contrasts drawn
from wide ranges (training/study_dataset.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training import study_dataset as sd
from training.dataset import LabelledImages, Split


@pytest.fixture(scope="module")
def bench() -> sd.StudyBenchmark:
    return sd.build_studies(sd.TINY)


def test_validation_and_test_studies_are_whole_and_in_order(bench: sd.StudyBenchmark) -> None:
    for split in (bench.val, bench.test):
        for index in range(len(split.studies)):
            rows = split.slices_of(index)
            assert split.position[rows].tolist() == list(range(sd.TINY.slices_per_study))


def test_a_lesion_is_labelled_on_its_adjacent_slices_only(bench: sd.StudyBenchmark) -> None:
    abnormal = 0
    for split in (bench.val, bench.test):
        for index, info in enumerate(split.studies):
            rows = split.slices_of(index)
            labelled = split.position[rows][split.labels[rows] != 0].tolist()
            assert labelled == list(info.lesion_slices)
            if info.label:
                abnormal += 1
                span = np.diff(info.lesion_slices)
                assert (span == 1).all()  # adjacent
                low, high = sd.TINY.span_slices
                assert low <= len(info.lesion_slices) <= high
                assert set(split.labels[rows]) == {0, info.label}
                assert sd.TINY.diameter_mm[0] <= info.diameter_mm <= sd.TINY.diameter_mm[1]
                assert sd.TINY.contrast[0] <= abs(info.contrast) <= sd.TINY.contrast[1]
                kind = bench.class_names[info.label]
                assert np.sign(info.contrast) == sd.CONTRAST_SIGN[kind]
            else:
                assert info.diameter_mm == info.contrast == 0 and info.lesion_slices == ()
    assert abnormal == round(sd.TINY.val_studies * 0.5) + round(sd.TINY.test_studies * 0.5)


def test_training_studies_give_every_lesion_slice_and_a_few_normal_ones(
    bench: sd.StudyBenchmark,
) -> None:
    train = bench.train
    for index, info in enumerate(train.studies):
        rows = train.slices_of(index)
        normal = int((train.labels[rows] == 0).sum())
        assert normal == sd.TINY.normal_slices_per_study
        assert (train.labels[rows] != 0).sum() == len(info.lesion_slices)


def test_extra_training_studies_add_to_training_and_keep_validation_and_test(
    bench: sd.StudyBenchmark, tmp_path: Path
) -> None:
    config = replace(sd.TINY, extra_train_studies=5)
    more = sd.build_studies(config)
    assert len(more.train.studies) == sd.TINY.train_studies + 5
    for name in ("val", "test"):
        ours, theirs = getattr(bench, name), getattr(more, name)
        assert np.array_equal(ours.images, theirs.images), name
        assert ours.studies == theirs.studies, name
    # The added studies are new ones, not copies of the first.
    added = more.train.images[more.train.study_index >= sd.TINY.train_studies]
    firsts = more.train.images[more.train.study_index < sd.TINY.train_studies]
    assert not any(np.array_equal(a, f) for a in added for f in firsts)
    assert more.description["config"]["extra_train_studies"] == 5
    assert sd.cache_path(config, tmp_path) != sd.cache_path(sd.TINY, tmp_path)
    # None asked: the key stays the one benchmarks built before the option had.
    assert "extra_train_studies" not in sd.config_record(replace(config, extra_train_studies=0))
    with pytest.raises(ValueError, match="extra_train_studies must be >= 0"):
        replace(sd.TINY, extra_train_studies=-1)


def test_the_slice_dataset_keeps_studies_apart(bench: sd.StudyBenchmark) -> None:
    data = bench.slice_dataset()  # LabelledImages refuses a group in two splits
    assert data.class_names == sd.CLASS_NAMES
    assert set(data.val.groups) == {s.study_id for s in bench.val.studies}
    lesion_slices = sum(len(s.lesion_slices) for s in bench.test.studies)
    assert (data.test.labels != 0).sum() == lesion_slices
    normal = len(bench.test.studies) * sd.TINY.normal_slices_per_study
    assert (data.test.labels == 0).sum() == normal


def test_same_config_same_pixels_and_a_cache_round_trip(
    bench: sd.StudyBenchmark, tmp_path: Path
) -> None:
    again = sd.build_studies(sd.TINY)
    assert np.array_equal(again.test.images, bench.test.images)
    path = sd.cache_path(sd.TINY, tmp_path)
    bench.save(path)
    loaded = sd.load_or_build(sd.TINY, tmp_path)
    assert loaded.test.studies == bench.test.studies
    assert np.array_equal(loaded.val.images, bench.val.images)
    assert loaded.description == bench.description


@pytest.mark.parametrize("contrast", [0.15, -0.15])
def test_a_small_faint_lesion_changes_its_slice_by_its_contrast(contrast: float) -> None:
    """A 6 mm, 15 % lesion planted on a template slice: a few dozen pixels move, in the
    contrast's direction and by about the contrast, and nothing else moves."""
    volume, _ = sd.mni152_volume()
    image = volume[:, :, sd.study_levels(volume, 24)[12]].astype(np.float64)
    kind = "bleed" if contrast > 0 else "infarct"
    lesion = sd.Lesion(kind, 6.0, contrast, centre_slice=10, span=3, aspect=1.0, irregularity=0.05)
    rng = np.random.default_rng(3)
    centre = sd._lesion_centre(rng, image > sd.TISSUE_LEVEL, 3.0, kind, large=False)
    planted, _mask = sd._plant(image, lesion, 1.0, centre, rng)
    relative = planted / np.maximum(image, 1e-6) - 1
    changed = np.abs(planted - image) > 0.02
    assert 5 <= changed.sum() <= 80  # about pi * 3**2 pixels, not the whole slice
    distance = np.hypot(*(np.indices(image.shape) - centre[:, None, None]))
    assert distance[changed].max() <= 6
    core = distance <= 1.5
    assert np.sign(relative[core].mean()) == np.sign(contrast)
    assert abs(relative[core].mean()) == pytest.approx(abs(contrast), rel=0.6)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"val_studies": 1}, "at least two studies"),
        ({"diameter_mm": (5.0, 2.0)}, "diameter_mm must be a range"),
        ({"span_slices": (0, 3)}, "span_slices"),
        ({"abnormal_fraction": 1.0}, "abnormal_fraction"),
    ],
)
def test_bad_configs_are_refused(change: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        sd.StudyConfig(**change)


def test_the_slice_table_takes_a_studys_normal_slices_from_its_middle_shares() -> None:
    # one study of 10 slices, a lesion on positions 4 and 5: 8 normal slices, 3 of them taken
    labels = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    study_set = sd.StudySet(
        images=np.zeros((10, 4, 4, 1), dtype=np.float32),
        labels=labels,
        study_index=np.zeros(10, dtype=np.int64),
        position=np.arange(10),
        studies=(sd.StudyInfo("s", 1, 10.0, -0.3, (4, 5)),),
    )
    rows = sd.slice_table_rows(study_set, 3).tolist()
    # normal positions 0 1 2 3 6 7 8 9: the middle of each third is 1, 6 and 8 (not 0 and 9)
    assert rows == [1, 4, 5, 6, 8]


def test_a_width_filter_drops_only_training_lesion_slices_narrower_than_it(
    bench: sd.StudyBenchmark,
) -> None:
    train = bench.train
    rows = train.sample_rows()
    widths = sd.lesion_width_mm(train, rows)
    lesion = train.labels[rows] != 0
    assert np.isinf(widths[~lesion]).all()
    # Each lesion is widest mid-span and at least 0.55 of its diameter on its end slices.
    for row, width in zip(rows[lesion], widths[lesion], strict=True):
        diameter = train.studies[train.study_index[row]].diameter_mm
        assert 0.55 * diameter - 1e-9 <= width <= diameter + 1e-9
    cut = float(np.median(widths[lesion]))
    full, filtered = bench.slice_dataset(), bench.slice_dataset(min_lesion_mm=cut)
    kept = int((widths[lesion] >= cut).sum())
    assert 0 < kept < lesion.sum()
    assert (filtered.train.labels != 0).sum() == kept
    assert (filtered.train.labels == 0).sum() == (full.train.labels == 0).sum()
    for name in ("val", "test"):  # the evaluation keeps every slice
        assert np.array_equal(getattr(filtered, name).labels, getattr(full, name).labels)
    assert filtered.description["train_min_lesion_mm"] == cut
    assert "train_min_lesion_mm" not in full.description
    assert filtered.fingerprint() != full.fingerprint()


def test_lesion_masks_keep_the_pixels_and_cover_the_lesion_slices_only(
    bench: sd.StudyBenchmark, tmp_path: Path
) -> None:
    masked = sd.build_studies(replace(sd.TINY, lesion_masks=True))
    assert bench.train.masks is None
    for name in ("train", "val", "test"):
        plain, split = getattr(bench, name), getattr(masked, name)
        assert np.array_equal(split.images, plain.images)  # the same pixels
        assert split.masks is not None and split.masks.dtype == np.uint8
        assert split.masks.shape == split.images.shape[:3]
        lesion = split.labels != 0
        assert not split.masks[~lesion].any()
        assert split.masks[lesion].max(axis=(1, 2)).all()  # partial cover on a small one
    assert sd.cache_path(replace(sd.TINY, lesion_masks=True), tmp_path) != sd.cache_path(
        sd.TINY, tmp_path
    )
    masked.save(tmp_path / "masked.npz")
    loaded = sd.StudyBenchmark.load(tmp_path / "masked.npz")
    assert np.array_equal(loaded.val.masks, masked.val.masks)


def test_a_lesion_mask_lies_where_the_lesion_changed_the_model_input() -> None:
    """The mask goes through the slice's own orientation and resize: on the input's grid its
    peak is where planting the lesion changed the input most."""
    volume, _ = sd.mni152_volume()
    image = volume[:, :, sd.study_levels(volume, 24)[12]].astype(np.float64)
    lesion = sd.Lesion("bleed", 12.0, 0.5, centre_slice=10, span=3, aspect=1.0, irregularity=0.05)
    rng = np.random.default_rng(5)
    centre = sd._lesion_centre(rng, image > sd.TISSUE_LEVEL, 6.0, "bleed", large=False)
    planted, mask = sd._plant(image, lesion, 1.0, centre, rng)
    size = 128
    change = sd.square_resize(sd.dicom_orientation(planted - image).astype(np.float32), size)
    on_grid = sd.mask_input(sd.dicom_orientation(mask), size)
    assert on_grid.shape == (size, size) and 15 <= (on_grid >= 128).sum() <= 60
    peak = np.unravel_index(np.argmax(change), change.shape)
    assert on_grid[peak] >= 128
    assert np.corrcoef(change.ravel(), on_grid.ravel())[0, 1] > 0.8
    assert not sd.mask_input(None, size).any()


def test_slices_of_a_masked_benchmark_carry_their_masks(
    bench: sd.StudyBenchmark, tmp_path: Path
) -> None:
    plain = bench.slice_dataset()
    slices = sd.build_studies(replace(sd.TINY, lesion_masks=True)).slice_dataset()
    assert plain.train.masks is None
    for name in ("train", "val", "test"):
        split = getattr(slices, name)
        assert split.masks is not None and len(split.masks) == len(split.labels)
        assert (split.masks.any(axis=(1, 2)) == (split.labels != 0)).all()
    assert slices.fingerprint() != plain.fingerprint()
    slices.save(tmp_path / "slices.npz")
    loaded = LabelledImages.load(tmp_path / "slices.npz")
    assert loaded.fingerprint() == slices.fingerprint()
    assert np.array_equal(loaded.train.masks, slices.train.masks)
    train = slices.train
    with pytest.raises(ValueError, match="one per image"):
        Split(train.images, train.labels, train.groups, train.masks[:, :-1])
