"""Training phases, the plateau and stopping rules, checkpoints and resuming a run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from training import train as train_module
from training.config import TrainSettings
from training.dataset import LabelledImages
from training.model import BASE_LAYER, build_classifier
from training.synthetic_dataset import TINY, build_benchmark
from training.train import (
    BEST_WEIGHTS,
    FINE_TUNE,
    INITIAL,
    LAST_WEIGHTS,
    STATE_FILE,
    RunMismatch,
    RunState,
    set_phase,
    train,
)

pytestmark = pytest.mark.integration

SMALL = replace(
    TINY, image_size=32, train_subjects=3, val_subjects=1, test_subjects=1, slices_per_subject=4
)


@pytest.fixture(scope="module")
def data() -> LabelledImages:
    return build_benchmark(SMALL)


def fast_settings(tmp_path: Path, **fields: object) -> TrainSettings:
    values = {
        "epochs": 2,
        "fine_tune_after": 1,
        "batch_size": 8,
        "dense_units": 8,
        "runs_dir": tmp_path / "runs",
        "repository": tmp_path / "models",
        **fields,
    }
    return TrainSettings(**values)


def trainable_flags(model: keras.Model) -> list[tuple[str, bool]]:
    return [(type(layer).__name__, layer.trainable) for layer in model.get_layer(BASE_LAYER).layers]


def test_phases_from_scratch_and_pretrained(tmp_path: Path) -> None:
    model = build_classifier(("normal", "mass"), image_size=32, dense_units=8)
    scratch = fast_settings(tmp_path)
    set_phase(model, INITIAL, scratch)
    assert all(trainable for _, trainable in trainable_flags(model))

    set_phase(model, FINE_TUNE, scratch)
    flags = trainable_flags(model)
    assert all(not t for kind, t in flags if kind == "BatchNormalization")
    assert all(t for kind, t in flags if kind == "Conv2D")

    pretrained = fast_settings(tmp_path, weights="imagenet")  # only the phase rule is read here
    set_phase(model, INITIAL, pretrained)
    assert not model.get_layer(BASE_LAYER).trainable
    assert model.get_layer("head_dense").trainable

    set_phase(model, FINE_TUNE, pretrained)
    flags = trainable_flags(model)
    cut = round(len(flags) * (1 - pretrained.fine_tune_fraction))
    assert not any(t for _, t in flags[:cut])
    assert any(t for _, t in flags[cut:])
    assert all(not t for kind, t in flags[cut:] if kind == "BatchNormalization")
    assert pretrained.fine_tune_factor == 0.1 and scratch.fine_tune_factor == 0.5


def test_fine_tuning_starts_after_five_epochs_only_with_pretrained_weights(tmp_path: Path) -> None:
    scratch = TrainSettings(epochs=60, runs_dir=tmp_path)
    pretrained = TrainSettings(epochs=60, weights="imagenet", runs_dir=tmp_path)
    assert scratch.fine_tune_start == 60 and pretrained.fine_tune_start == 5
    assert TrainSettings(epochs=60, fine_tune_after=8).fine_tune_start == 8
    assert TrainSettings(epochs=3, weights="imagenet").fine_tune_start == 3


class ScriptedValidation:
    """Replaces validation_metrics with scripted validation losses and macro-F1s."""

    def __init__(self, losses: list[float], f1s: list[float]) -> None:
        self.scores = iter(zip(losses, f1s, strict=True))

    def __call__(self, probabilities: np.ndarray, labels: np.ndarray, n: int) -> dict:
        loss, f1 = next(self.scores)
        return {"val_loss": loss, "val_accuracy": 0.5, "val_macro_f1": f1}


def test_plateau_lowers_the_rate_and_patience_stops(
    tmp_path: Path, data: LabelledImages, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fast_settings(
        tmp_path,
        plateau_patience=2,
        early_stopping_patience=4,
        plateau_factor=0.5,
        learning_rate=1e-3,
    )
    state = RunState(learning_rate=1e-3)
    model = build_classifier(data.class_names, image_size=32, dense_units=8)
    train_module.compile_for(model, 1e-3)
    losses = [1.0, 0.9] + [0.95] * 7
    f1s = [0.5, 0.5, 0.5, 0.6] + [0.6] * 5
    monkeypatch.setattr(train_module, "validation_metrics", ScriptedValidation(losses, f1s))
    callback = train_module._EpochEnd(
        data, settings, state, tmp_path, train_module.NoProgress(), model
    )
    callback.set_model(model)
    rates = []
    for epoch in range(9):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {"loss": 1.0, "accuracy": 0.5})
        rates.append(state.learning_rate)
        if model.stop_training:
            break
    # The loss improves at epochs 1-2, then every two flat epochs halve the rate. Macro-F1
    # improves last at epoch 4 (the loss did not), so four epochs later training stops.
    assert rates == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4]
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1.25e-4)
    assert state.stopped_early and model.stop_training and state.epoch == 8
    assert state.best_epoch == 4
    assert (tmp_path / LAST_WEIGHTS).is_file() and (tmp_path / BEST_WEIGHTS).is_file()
    assert json.loads((tmp_path / STATE_FILE).read_text())["epoch"] == 8


def test_a_select_function_chooses_the_kept_epoch_instead_of_macro_f1(
    tmp_path: Path, data: LabelledImages, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fast_settings(tmp_path, early_stopping_patience=3, plateau_patience=10)
    state = RunState(learning_rate=1e-3, selected_by=train_module.BY_SELECT)
    model = build_classifier(data.class_names, image_size=32, dense_units=8)
    train_module.compile_for(model, 1e-3)
    # Macro-F1 is best at epoch 1; the first selection figure at epoch 3. Epoch 2's second
    # figure is the largest of all: recorded, it does not rank.
    f1s = [0.9, 0.5, 0.4, 0.4, 0.4, 0.4]
    monkeypatch.setattr(train_module, "validation_metrics", ScriptedValidation([1.0] * 6, f1s))
    figures = iter([(0.6, 0.2), (0.7, 0.9), (0.8, 0.1), (0.8, 0.1), (0.75, 0.5), (0.5, 0.5)])

    def select(scored: keras.Model) -> dict[str, float]:
        assert scored is model
        first, second = next(figures)
        return {"val_lesion_slice_auroc": first, "val_study_auroc": second}

    callback = train_module._EpochEnd(
        data, settings, state, tmp_path, train_module.NoProgress(), model, select
    )
    callback.set_model(model)
    for epoch in range(6):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {"loss": 1.0, "accuracy": 0.5})
        if epoch == 2:
            kept = [w.copy() for w in model.get_weights()]
        else:  # other epochs' weights differ from the kept ones
            model.set_weights([w + 1.0 for w in model.get_weights()])
        if model.stop_training:
            break
    # Epoch 4 equals epoch 3 (not better), 5 and 6 are worse: three epochs without a better
    # one stop the run after epoch 6.
    assert state.best_epoch == 3 and state.best_selection == 0.8
    assert state.stopped_early and state.epoch == 6
    assert [h["val_study_auroc"] for h in state.history] == [0.2, 0.9, 0.1, 0.1, 0.5, 0.5]
    best = build_classifier(data.class_names, image_size=32, dense_units=8)
    best.load_weights(tmp_path / BEST_WEIGHTS)
    for saved, expected in zip(best.get_weights(), kept, strict=True):
        np.testing.assert_array_equal(saved, expected)


def test_a_run_keeps_the_measure_it_began_with(tmp_path: Path, data: LabelledImages) -> None:
    settings = fast_settings(tmp_path, epochs=1)

    def refuse(model: keras.Model) -> dict[str, float]:
        raise AssertionError("a run that began by macro-F1 does not switch measures")

    def folder(name: str, selected_by: str) -> Path:
        run_dir = tmp_path / name
        train_module._prepare_run_dir(run_dir, settings, data, data.fingerprint())
        RunState(learning_rate=1e-3, finished=True, selected_by=selected_by).save(run_dir)
        return run_dir

    by_studies = folder("studies", train_module.BY_SELECT)
    with pytest.raises(RunMismatch, match="validation studies"):
        train(data, settings, by_studies)
    # A run from before the field (no "selected_by") chose by macro-F1, and keeps doing so.
    old = folder("old", train_module.BY_MACRO_F1)
    recorded = json.loads((old / STATE_FILE).read_text())
    del recorded["selected_by"], recorded["best_selection"]
    (old / STATE_FILE).write_text(json.dumps(recorded))
    assert RunState.load(old).selected_by == train_module.BY_MACRO_F1
    assert train(data, settings, old, select=refuse).state.finished


def test_a_run_resumes_where_it_stopped(tmp_path: Path, data: LabelledImages) -> None:
    run_dir = tmp_path / "run"
    first = train(data, fast_settings(tmp_path, epochs=1), run_dir)
    assert first.state.epoch == 1 and first.state.phase == INITIAL
    before = json.loads((run_dir / STATE_FILE).read_text())["history"]

    # Same data and settings, more epochs: continues from epoch 1, into fine-tuning.
    state = RunState.load(run_dir)
    state.finished = False
    state.save(run_dir)
    second = train(data, fast_settings(tmp_path, epochs=2), run_dir)
    assert second.state.epoch == 2 and second.state.phase == FINE_TUNE
    history = second.state.history
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == before[0]
    assert history[1]["phase"] == FINE_TUNE
    assert history[1]["learning_rate"] == pytest.approx(history[0]["learning_rate"] * 0.5)
    probabilities = second.model.predict(np.repeat(data.test.images, 3, axis=-1), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    # The run folder is not reused for other data or other settings.
    other = build_benchmark(replace(SMALL, seed=SMALL.seed + 1))
    with pytest.raises(RunMismatch, match="other data"):
        train(other, fast_settings(tmp_path, epochs=2), run_dir)
    with pytest.raises(RunMismatch, match="learning_rate"):
        train(data, fast_settings(tmp_path, epochs=2, learning_rate=0.01), run_dir)


@pytest.mark.parametrize(
    ("augment", "slices_from", "resampled"),
    [
        (None, None, True),  # the slice benchmark, folders, DICOM: augmented by default
        (None, "studies", False),  # whole synthetic studies: their pose already varies
        (True, "studies", True),  # an operator's explicit choice wins
        (False, None, False),
    ],
)
def test_which_runs_resample_their_training_images(
    tmp_path: Path,
    data: LabelledImages,
    monkeypatch: pytest.MonkeyPatch,
    augment: bool | None,
    slices_from: str | None,
    resampled: bool,
) -> None:
    seen: dict[str, bool] = {}
    real_balance = train_module.balance_with_augmentation

    class Seen(Exception):
        """Stops the run once the stream is asked for: what it was asked is all we need."""

    def balance(split, n_classes, seed, geometric):  # type: ignore[no-untyped-def]
        seen["copies"] = geometric
        return real_balance(split, n_classes, seed, geometric)

    def stream(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["stream"] = args[5]
        raise Seen

    monkeypatch.setattr(train_module, "balance_with_augmentation", balance)
    monkeypatch.setattr(train_module, "training_stream", stream)
    description = {**data.description, **({"slices_from": slices_from} if slices_from else {})}
    described = replace(data, description=description)
    settings = fast_settings(tmp_path, epochs=1, fine_tune_after=None, augment=augment)
    with pytest.raises(Seen):
        train(described, settings, tmp_path / "run")
    assert seen == {"copies": resampled, "stream": resampled}
