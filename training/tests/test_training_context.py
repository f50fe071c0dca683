"""Context from neighbouring slices (issue 18 point 3, 2.5D) in training: the study benchmark's
inputs, the same layout as the worker builds from a stored series, the setting's refusal where
slice order is unknown, and the choice exported with the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference_worker.series import SelectionRules, select_series
from inference_worker.tests.test_worker_scoring import refs_for
from scanwatch.imaging import NEIGHBOURS, NO_CONTEXT, preprocess_slice
from scanwatch.sample import build_mr_study
from schemas.training_events import DatasetSpec
from training import study_dataset as sd
from training.cli import main
from training.config import TrainSettings
from training.lifecycle import ContextUnavailable, MasksUnavailable, load_dataset


@pytest.fixture(scope="module")
def bench() -> sd.StudyBenchmark:
    """The tiny study benchmark with its training slices' neighbours rendered."""
    return sd.build_studies(replace(sd.TINY, train_neighbours=True))


def constant_set(values: list[list[float]]) -> sd.StudySet:
    """Studies whose slices (in position order) are constant images of the given values."""
    images, study_index, position = [], [], []
    for study, slices in enumerate(values):
        for p, value in enumerate(slices):
            images.append(np.full((4, 4, 1), value, np.float32))
            study_index.append(study)
            position.append(p)
    infos = tuple(sd.StudyInfo(f"s{i}", 0, 0.0, 0.0, ()) for i in range(len(values)))
    n = len(images)
    return sd.StudySet(
        np.stack(images), np.zeros(n, np.int64), np.array(study_index), np.array(position), infos
    )


def test_neighbours_stay_inside_their_study_and_clamp_at_its_ends() -> None:
    split = constant_set([[1, 2, 3], [11, 12, 13, 14]])
    inputs = sd.study_inputs(split, NEIGHBOURS)
    assert [tuple(inputs[i, 0, 0]) for i in range(len(inputs))] == [
        (1, 1, 2),
        (1, 2, 3),
        (2, 3, 3),  # not study 1's first slice above
        (11, 11, 12),  # not study 0's last slice below
        (11, 12, 13),
        (12, 13, 14),
        (13, 14, 14),
    ]
    # none: the grey images as they are, for the input pipeline to repeat (as before)
    assert sd.study_inputs(split, NO_CONTEXT) is not None
    np.testing.assert_array_equal(sd.study_inputs(split, NO_CONTEXT), split.images)
    with pytest.raises(ValueError, match="context must be one of"):
        sd.study_inputs(split, "2.5d")


def test_the_default_benchmark_keeps_its_cache_file_and_refuses_neighbours() -> None:
    # The names the benchmark's cache files had before train_neighbours existed: a default
    # benchmark is not rebuilt, nor described otherwise.
    assert sd.cache_path(sd.TINY, Path(".")).name == "studies-v1-64px-fa259cd716da6dba.npz"
    assert sd.cache_path(sd.DEFAULT, Path(".")).name == "studies-v1-128px-3ebaa28f4824fc88.npz"
    assert "train_neighbours" not in sd.config_record(sd.TINY)
    plain = sd.build_studies(sd.TINY)
    assert plain.train.context_only is None
    assert plain.slice_dataset().train.images.shape[-1] == 1
    with pytest.raises(ValueError, match="train_neighbours"):
        plain.slice_dataset(NEIGHBOURS)


def test_training_slices_get_their_rendered_neighbours(bench: sd.StudyBenchmark) -> None:
    train = bench.train
    assert train.context_only is not None and train.context_only.any()
    plain = bench.slice_dataset(NO_CONTEXT)
    context = bench.slice_dataset(NEIGHBOURS)
    # The same slices, labels and groups in both; context rows are not training slices.
    assert len(plain.train) == len(context.train) == int((~train.context_only).sum())
    for name in ("train", "val", "test"):
        a, b = getattr(plain, name), getattr(context, name)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.groups, b.groups)
        assert a.images.shape[-1] == 1 and b.images.shape[-1] == 3
        np.testing.assert_array_equal(b.images[..., 1], a.images[..., 0])
    # Each training slice's channel 0 is the rendered slice one position lower in its study.
    at = {
        (int(s), int(p)): r
        for r, (s, p) in enumerate(zip(train.study_index, train.position, strict=True))
    }
    samples = train.sample_rows()
    for k, row in enumerate(samples):
        s, p = int(train.study_index[row]), int(train.position[row])
        below = at[(s, p - 1)] if p > 0 else row
        above = at[(s, p + 1)] if p < sd.TINY.slices_per_study - 1 else row
        np.testing.assert_array_equal(context.train.images[k, ..., 0], train.images[below, ..., 0])
        np.testing.assert_array_equal(context.train.images[k, ..., 2], train.images[above, ..., 0])


def test_a_saved_benchmark_keeps_its_context_rows(bench: sd.StudyBenchmark, tmp_path) -> None:
    bench.save(tmp_path / "b.npz")
    loaded = sd.StudyBenchmark.load(tmp_path / "b.npz")
    assert loaded.train.context_only is not None
    np.testing.assert_array_equal(loaded.train.context_only, bench.train.context_only)
    assert (
        loaded.slice_dataset(NEIGHBOURS).fingerprint()
        == bench.slice_dataset(NEIGHBOURS).fingerprint()
    )


def test_training_and_the_worker_build_the_same_inputs_from_the_same_slices(tmp_path) -> None:
    """A stored series, read by the worker (every slice, and every other slice with
    ``max_gap_mm``) and by training's builder (the same stored slices as a study, preprocessed
    as the benchmark is): the same three channels, to the bit."""
    files = build_mr_study(tmp_path / "mr", patient_id="P-CTX", n_slices=9)
    datasets = sorted(
        (pydicom.dcmread(p) for p in files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    size = 32
    grey = [
        preprocess_slice(d.pixel_array, size, float(d.RescaleSlope), float(d.RescaleIntercept))
        for d in datasets
    ]
    study = sd.StudySet(
        np.stack([g[..., :1] for g in grey]),
        np.zeros(len(grey), np.int64),
        np.zeros(len(grey), np.int64),
        np.arange(len(grey)),
        (sd.StudyInfo("s", 0, 0.0, 0.0, ()),),
    )
    refs = list(reversed(refs_for(files)))  # arrival order is not slice order
    worker = select_series(refs, size, context=NEIGHBOURS)
    training = sd.study_inputs(study, NEIGHBOURS)
    np.testing.assert_array_equal(worker.images, training)
    # the layout itself: slice 3's channels are slices 2, 3, 4
    np.testing.assert_array_equal(worker.images[3, ..., 0], grey[2][..., 0])
    np.testing.assert_array_equal(worker.images[3, ..., 2], grey[4][..., 0])

    # With a gap rule only some slices are scored; their neighbours are still the series'.
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    spacing, thickness = z[1] - z[0], float(datasets[0].SliceThickness)
    rules = SelectionRules(max_gap_mm=2 * spacing - thickness)
    subset = select_series(refs, size, rules, context=NEIGHBOURS)
    scored = [
        z.index(float(pydicom.dcmread(s.path).ImagePositionPatient[2])) for s in subset.slices
    ]
    assert len(scored) < len(z) and scored != list(range(len(scored)))
    np.testing.assert_array_equal(
        subset.images, sd.study_inputs(study, NEIGHBOURS, np.array(scored))
    )

    # none: the slice repeated, a view (the worker's hot path, unchanged)
    plain = select_series(refs, size)
    assert plain.images.strides[-1] == 0
    np.testing.assert_array_equal(plain.images[..., 0], plain.images[..., 2])
    np.testing.assert_array_equal(plain.images[3, ..., 1], grey[3][..., 0])


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_neighbours_is_refused_where_slice_order_is_unknown(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dataset", "benchmark", "--preset", "tiny", "--runs-dir", str(tmp_path)]
    if how == "flag":
        argv += ["--context", "neighbours"]
    else:
        monkeypatch.setenv("SCANWATCH_TRAIN_CONTEXT", "neighbours")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--context neighbours" in err and "--dataset benchmark" in err
    assert "--dataset studies" in err
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing trained


def test_an_unknown_context_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--context", "2.5d"])
    assert "'2.5d'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="context must be one of none, neighbours"):
        TrainSettings(context="2.5d")


def test_a_job_over_kafka_cannot_ask_neighbours_of_a_slice_dataset(tmp_path: Path) -> None:
    settings = TrainSettings(context=NEIGHBOURS, cache_dir=tmp_path)
    with pytest.raises(ContextUnavailable, match="'neighbours'.*benchmark dataset"):
        load_dataset(DatasetSpec(kind="benchmark", preset="tiny"), settings, tmp_path)


def test_a_job_over_kafka_cannot_ask_a_mask_head_of_a_slice_dataset(tmp_path: Path) -> None:
    settings = TrainSettings(mask_weight=1.0, cache_dir=tmp_path)
    with pytest.raises(MasksUnavailable, match="only the studies dataset.*benchmark dataset"):
        load_dataset(DatasetSpec(kind="benchmark", preset="tiny"), settings, tmp_path)
    with pytest.raises(ValueError, match="mask_weight"):
        TrainSettings(mask_weight=-1)
    with pytest.raises(ValueError, match="mask_weight needs augment off"):
        TrainSettings(mask_weight=1.0, augment=True)
    assert TrainSettings(mask_weight=1.0, augment=False).mask_weight == 1.0
    assert TrainSettings(mask_weight=1.0, mask_stride=8).mask_stride == 8
    with pytest.raises(ValueError, match="mask_stride"):
        TrainSettings(mask_weight=1.0, mask_stride=4)


@pytest.mark.integration
def test_the_context_travels_with_the_exported_model(tmp_path: Path) -> None:
    """Exported in the model's study_rule output (the contract's signature unchanged: images
    (B, H, W, 3) float32), read back by the pipeline that evaluates published versions."""
    import keras

    from scanwatch.saved_model import read_signature
    from training.export import check_signatures, export_saved_model
    from training.lifecycle import predict_saved_model_with_rule

    size = 16
    inputs = keras.Input((size, size, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    images = np.random.default_rng(0).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    for context in (NEIGHBOURS, NO_CONTEXT):
        rule = sd_rule(context)
        path = export_saved_model(
            model, ("normal", "mass"), 0.4, tmp_path, f"m-{context}", 1, study_rule=rule
        )
        assert check_signatures(path, saliency=False) == []
        signature_inputs, _ = read_signature(path)
        assert signature_inputs["images"].shape == (-1, size, size, 3)
        assert signature_inputs["images"].dtype == "float32"
        probabilities, read = predict_saved_model_with_rule(path, images)
        assert read == rule and read.context == context
        assert probabilities.shape == (3, 2)


def sd_rule(context: str):
    from scanwatch.study_score import StudyRule

    return StudyRule("max", operating_point="test", context=context)


def test_a_none_run_can_train_on_the_neighbours_benchmark_s_slices() -> None:
    from training.cli import _dataset_spec, _settings, build_parser

    args = build_parser().parse_args(["train", "--dataset", "studies", "--with-neighbours"])
    assert _dataset_spec(args).train_neighbours is True
    assert _settings(args).context == NO_CONTEXT
    args = build_parser().parse_args(["train", "--dataset", "studies", "--context", "neighbours"])
    assert _dataset_spec(args).train_neighbours is False  # load_dataset adds it for neighbours
    assert _settings(args).context == NEIGHBOURS


def test_study_only_options_are_refused_elsewhere_and_negative_values_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dataset", "benchmark", "--preset", "tiny", "--runs-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--min-lesion-mm", "6"])
    assert exited.value.code == 2
    assert "--min-lesion-mm needs --dataset studies" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "studies", "--min-lesion-mm", "-1"])
    assert "must be 0 or more millimetres, not -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--extra-train-studies", "100"])
    assert exited.value.code == 2
    assert "--extra-train-studies needs --dataset studies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "studies", "--extra-train-studies", "-3"])
    assert "must be 0 or more, not -3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--mask-weight", "1"])
    assert exited.value.code == 2
    assert "--mask-weight needs --dataset studies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "studies", "--mask-weight", "-0.5"])
    assert "must be 0 or more, not -0.5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    from training.cli import _dataset_spec, build_parser

    argv = ["train", "--dataset", "studies", "--extra-train-studies", "7"]
    args = build_parser().parse_args(argv)
    assert _dataset_spec(args).extra_train_studies == 7
