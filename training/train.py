"""Training as the article describes it, in a run folder that can be resumed.

Phases:

1. **initial** (epochs ``[0, fine_tune_after)``): a pretrained base stays frozen and only the head
   learns; a base trained from scratch has no features to keep, so all of it learns.
2. **fine-tune** (from ``fine_tune_after``): the top ``fine_tune_top_fraction`` of the base's
   layers is trainable (all of it from scratch, 30 % of a pretrained one by default), the rest
   is frozen, every BatchNormalization layer is frozen (inference statistics), and the model is
   recompiled with a lower learning rate (× 0.5 from scratch, × 0.1 pretrained, by default).
   Plateau and early-stopping counters start afresh, as they would in a second ``fit``.
   A base trained from scratch gets its BatchNorm statistics re-estimated for the current
   weights just before they are frozen (and uses a BatchNorm momentum suited to short runs).

Fine-tuning starts after five epochs with pretrained weights (the article); a base trained from
scratch has no fine-tune phase unless ``fine_tune_after`` asks for one.

Throughout: categorical cross-entropy, Adam; the learning rate drops by ``plateau_factor`` after
``plateau_patience`` epochs without validation-loss improvement (ReduceLROnPlateau's rule); the
weights of the best epoch are kept, and training stops after ``early_stopping_patience`` epochs
without a better one. The best epoch is the one with the best validation macro-F1, or, when
:func:`train` is given a ``select`` function (a run on whole studies:
:func:`training.study_evaluation.epoch_selection`), the largest first figure it returns (ties:
the lower validation loss). A run keeps the measure it began with.

With ``mask_weight`` (slices with lesion masks), the classifier trains inside
:func:`training.model.with_mask_head`: the loss adds ``mask_weight`` × the mask head's (a
weighted binary cross-entropy per cell); validation, the best epoch and the returned model are
the classifier's alone.

A run folder holds ``settings.json``, ``dataset.json``, ``state.json`` (epoch, phase, learning
rate, plateau and stopping counters, history), ``last.weights.h5`` and ``best.weights.h5``,
written after every epoch. Calling :func:`train` again on an unfinished run folder continues
after its last completed epoch (Adam's moment estimates restart; everything else is restored).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np
from sklearn.metrics import f1_score

from scanwatch.durable import replace_file, write_text_atomic
from training.config import TrainSettings
from training.dataset import LabelledImages
from training.export import load_exported_weights
from training.input_pipeline import balance_with_augmentation, inference_stream, training_stream
from training.model import (
    BASE_LAYER,
    MASK_OUTPUT,
    OUTPUT_LAYER,
    build_classifier,
    with_mask_head,
)

logger = logging.getLogger(__name__)

INITIAL, FINE_TUNE = "initial", "fine-tune"
STATE_FILE = "state.json"
SETTINGS_FILE = "settings.json"
DATASET_FILE = "dataset.json"
LAST_WEIGHTS = "last.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
#: Settings that may differ when a run is resumed (they do not change what is learned).
RESUME_MAY_DIFFER = {
    "epochs",
    "repository",
    "runs_dir",
    "cache_dir",
    "kafka_bootstrap_servers",
    "log_level",
    "early_stopping_patience",
}
#: BatchNormalization momentum of a base trained from scratch. Keras' EfficientNet uses 0.99,
#: made for long ImageNet runs: over the few hundred steps of a small dataset its moving
#: statistics lag far behind the weights, so inference-mode outputs (validation, and everything
#: once fine-tuning freezes BatchNorm) are garbage. 0.9 tracks within a few dozen steps.
SCRATCH_BN_MOMENTUM = 0.9
#: Training batches used to re-estimate BatchNorm statistics before they are frozen.
RECALIBRATION_BATCHES = 50
#: Smallest relative improvement of the validation loss that counts.
MIN_DELTA = 1e-4
#: How a run chooses the epoch whose weights it keeps (``RunState.selected_by``).
BY_MACRO_F1, BY_SELECT = "validation macro-F1", "validation studies"

#: Scores a model after an epoch: named validation figures, all recorded in the epoch's history;
#: the first ranks the epochs (larger is better).
Select = Callable[[keras.Model], dict[str, float]]


class RunMismatch(ValueError):
    """An existing run folder was made with other data or settings; it is not resumed."""


class Progress(Protocol):
    """What a front end (CLI bars, worker status events) hears from a run."""

    def on_start(self, start_epoch: int, epochs: int, steps_per_epoch: int) -> None: ...
    def on_batch(self, step: int) -> None: ...
    def on_epoch(self, epoch: int, phase: str, metrics: dict[str, float]) -> None: ...


class NoProgress:
    def on_start(self, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        pass

    def on_batch(self, step: int) -> None:
        pass

    def on_epoch(self, epoch: int, phase: str, metrics: dict[str, float]) -> None:
        pass


@dataclass
class RunState:
    """Everything needed to continue a run after its last completed epoch."""

    epoch: int = 0  # completed epochs
    phase: str = INITIAL
    learning_rate: float = 0.0
    best_val_loss: float = float("inf")
    plateau_wait: int = 0
    stop_wait: int = 0
    best_macro_f1: float = -1.0
    best_epoch: int = -1
    #: Runs from before this field chose by macro-F1, so that is the default when resumed.
    selected_by: str = BY_MACRO_F1
    #: The best epoch's first ``select`` figure (runs selected by macro-F1: None).
    best_selection: float | None = None
    finished: bool = False
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, run_dir: Path) -> None:
        _write_json(run_dir / STATE_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        return cls(**json.loads((run_dir / STATE_FILE).read_text()))


@dataclass(frozen=True)
class TrainResult:
    model: keras.Model
    state: RunState
    run_dir: Path
    dataset_fingerprint: str
    balance_added: list[int]
    epoch_seconds: list[float]


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str))


def _save_weights(model: keras.Model, path: Path) -> None:
    temp = path.with_name(f".tmp-{path.name}")
    model.save_weights(temp)
    replace_file(temp, path)


def _load_weights(model: keras.Model, path: Path) -> None:
    # The file also holds the optimizer of the phase it was saved in; after a phase change (a
    # new optimizer) Keras warns that it skips those: the model's weights are what matters.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [
        layer
        for layer in model.get_layer(BASE_LAYER).layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def recalibrate_batch_norm(model: keras.Model, stream: Any, batches: int) -> None:
    """Re-estimate BatchNorm moving statistics for the current weights (no weight update).

    Runs ``batches`` training batches forward in training mode with a short momentum, so that
    the statistics frozen by fine-tuning describe the network as it is now.
    """
    import tensorflow as tf

    layers = batch_norm_layers(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.8
    forward = tf.function(lambda images: model(images, training=True))
    for images, _labels in stream.take(batches):
        forward(images)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def set_phase(model: keras.Model, phase: str, settings: TrainSettings) -> None:
    """Make the right layers trainable for ``phase`` (see the module docstring)."""
    base = model.get_layer(BASE_LAYER)
    if phase == INITIAL:
        base.trainable = settings.weights is None
        return
    base.trainable = True
    layers = base.layers
    first_trainable = int(round(len(layers) * (1 - settings.fine_tune_fraction)))
    for index, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= first_trainable and not is_bn


#: How much more a lesion cell weighs than a clear one in the mask head's loss (a lesion
#: covers a few cells of the 64 at 128², none on most slices).
LESION_CELL_WEIGHT = 20.0


def mask_loss(target: Any, predicted: Any) -> Any:
    """Binary cross-entropy of the mask head per cell, a cell weighing 1 + 20 × its lesion
    cover, averaged over a slice's cells."""
    import tensorflow as tf

    predicted = tf.clip_by_value(predicted, 1e-6, 1 - 1e-6)
    loss = -(target * tf.math.log(predicted) + (1 - target) * tf.math.log(1 - predicted))
    return tf.reduce_mean(loss * (1 + LESION_CELL_WEIGHT * target), axis=(1, 2, 3))


def compile_for(model: keras.Model, learning_rate: float, mask_weight: float = 0.0) -> None:
    """Adam and categorical cross-entropy; with ``mask_weight``, a model of
    :func:`training.model.with_mask_head` also learns its mask, weighted so."""
    if not mask_weight:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
        return
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={OUTPUT_LAYER: "categorical_crossentropy", MASK_OUTPUT: mask_loss},
        loss_weights={OUTPUT_LAYER: 1.0, MASK_OUTPUT: mask_weight},
        metrics={OUTPUT_LAYER: ["accuracy"]},
    )


def validation_metrics(
    probabilities: np.ndarray, labels: np.ndarray, n_classes: int
) -> dict[str, float]:
    """Loss (categorical cross-entropy), accuracy and macro-F1 of predictions."""
    clipped = np.clip(probabilities, 1e-7, 1.0)
    loss = float(-np.mean(np.log(clipped[np.arange(len(labels)), labels])))
    predicted = probabilities.argmax(axis=1)
    return {
        "val_loss": loss,
        "val_accuracy": float(np.mean(predicted == labels)),
        "val_macro_f1": float(
            f1_score(
                labels, predicted, average="macro", labels=list(range(n_classes)), zero_division=0
            )
        ),
    }


class _EpochEnd(keras.callbacks.Callback):
    """Validation, LR plateau, early stopping, checkpoints and state after every epoch."""

    def __init__(
        self,
        data: LabelledImages,
        settings: TrainSettings,
        state: RunState,
        run_dir: Path,
        progress: Progress,
        classifier: keras.Model,
        select: Select | None = None,
    ) -> None:
        super().__init__()
        self.data, self.settings, self.state, self.run_dir = data, settings, state, run_dir
        self.progress, self.select = progress, select
        #: What is validated and kept as the best: the model being fit, or the classifier
        #: inside it (a mask head's training model).
        self.classifier = classifier
        self.val_stream = inference_stream(data.val.images, settings.batch_size)
        self.epoch_seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.progress.on_batch(batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        state, settings = self.state, self.settings
        logs = logs or {}
        probabilities = self.classifier.predict(self.val_stream, verbose=0)
        accuracy = logs.get("accuracy", logs.get(f"{OUTPUT_LAYER}_accuracy", float("nan")))
        metrics = {
            "loss": float(logs.get("loss", float("nan"))),
            "accuracy": float(accuracy),
            **validation_metrics(probabilities, self.data.val.labels, len(self.data.class_names)),
            "learning_rate": state.learning_rate,
        }
        if f"{MASK_OUTPUT}_loss" in logs:
            metrics["mask_loss"] = float(logs[f"{MASK_OUTPUT}_loss"])
        selection = self.select(self.classifier) if self.select is not None else {}
        metrics.update(selection)
        improved = metrics["val_loss"] < state.best_val_loss * (1 - MIN_DELTA)
        if improved:
            state.best_val_loss = metrics["val_loss"]
            state.plateau_wait = 0
        else:
            state.plateau_wait += 1
        if state.plateau_wait >= settings.plateau_patience:
            new_rate = max(
                state.learning_rate * settings.plateau_factor, settings.min_learning_rate
            )
            if new_rate < state.learning_rate:
                self.model.optimizer.learning_rate.assign(new_rate)
                logger.info(
                    "learning rate reduced on plateau",
                    extra={"epoch": epoch + 1, "learning_rate": new_rate},
                )
                state.learning_rate = new_rate
            state.plateau_wait = 0
        if self.select is None:
            better = (metrics["val_macro_f1"], -metrics["val_loss"]) > (
                state.best_macro_f1,
                -self._best_loss_at_best(),
            )
        else:
            ranked = next(iter(selection.values()))
            best = -math.inf if state.best_selection is None else state.best_selection
            better = (ranked, -metrics["val_loss"]) > (best, -self._best_loss_at_best())
            if better:
                state.best_selection = ranked
        if better:
            state.best_macro_f1 = metrics["val_macro_f1"]
            state.best_epoch = epoch + 1
            state.stop_wait = 0
            _save_weights(self.classifier, self.run_dir / BEST_WEIGHTS)
        else:
            state.stop_wait += 1
        _save_weights(self.model, self.run_dir / LAST_WEIGHTS)
        state.epoch = epoch + 1
        metrics["seconds"] = time.perf_counter() - self._started
        self.epoch_seconds.append(metrics["seconds"])
        state.history.append({"epoch": epoch + 1, "phase": state.phase, **metrics})
        if state.stop_wait >= settings.early_stopping_patience:
            state.stopped_early = True
            self.model.stop_training = True
            logger.info("early stopping", extra={"epoch": epoch + 1})
        state.save(self.run_dir)
        logger.info("epoch done", extra={"epoch": epoch + 1, "phase": state.phase, **metrics})
        self.progress.on_epoch(epoch + 1, state.phase, metrics)

    def _best_loss_at_best(self) -> float:
        for entry in self.state.history:
            if entry["epoch"] == self.state.best_epoch:
                return float(entry["val_loss"])
        return float("inf")


def _settings_record(settings: TrainSettings) -> dict[str, Any]:
    return json.loads(settings.model_dump_json())


def _prepare_run_dir(
    run_dir: Path, settings: TrainSettings, data: LabelledImages, fingerprint: str
) -> RunState | None:
    """Create the run folder, or check that an existing one is this run; return its state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / STATE_FILE).is_file():
        _write_json(run_dir / SETTINGS_FILE, _settings_record(settings))
        _write_json(
            run_dir / DATASET_FILE,
            {
                "fingerprint": fingerprint,
                "class_names": list(data.class_names),
                "summary": data.summary(),
                "description": data.description,
            },
        )
        return None
    recorded = json.loads((run_dir / DATASET_FILE).read_text())
    if recorded["fingerprint"] != fingerprint:
        raise RunMismatch(f"{run_dir} was trained on other data ({recorded['fingerprint'][:12]})")
    before = json.loads((run_dir / SETTINGS_FILE).read_text())
    now = _settings_record(settings)
    # A setting added after the run began was at its default then (e.g. ``context``).
    defaults = {k: field.default for k, field in TrainSettings.model_fields.items()}
    changed = sorted(
        k for k in now if k not in RESUME_MAY_DIFFER and before.get(k, defaults.get(k)) != now[k]
    )
    if changed:
        raise RunMismatch(f"{run_dir} was made with other settings: {', '.join(changed)}")
    _write_json(run_dir / SETTINGS_FILE, now)
    return RunState.load(run_dir)


def train(
    data: LabelledImages,
    settings: TrainSettings,
    run_dir: Path,
    progress: Progress | None = None,
    select: Select | None = None,
) -> TrainResult:
    """Train (or continue training) in ``run_dir``; return the model with its best weights.

    ``select``: how the best epoch is chosen instead of by validation macro-F1 (module
    docstring). A resumed run keeps the measure it began with."""
    progress = progress or NoProgress()
    run_dir = Path(run_dir)
    fingerprint = data.fingerprint()
    state = _prepare_run_dir(run_dir, settings, data, fingerprint)
    resumed = state is not None
    wanted = BY_MACRO_F1 if select is None else BY_SELECT
    state = state or RunState(learning_rate=settings.learning_rate, selected_by=wanted)
    if state.selected_by != wanted:
        if state.selected_by == BY_SELECT:
            raise RunMismatch(
                f"{run_dir} chooses its best epoch by its {BY_SELECT}; resume it with them"
            )
        logger.warning(
            "run keeps choosing its best epoch as it began",
            extra={"run_dir": str(run_dir), "selected_by": state.selected_by},
        )
        select = None
    n_classes = len(data.class_names)

    classifier = build_classifier(
        data.class_names,
        image_size=data.image_size,
        variant=settings.variant,
        weights=settings.weights,
        dense_units=settings.dense_units,
        dropout=settings.dropout,
        seed=settings.seed,
    )
    if settings.init_from is not None:
        load_exported_weights(classifier, settings.init_from)
    elif settings.weights is None:
        for layer in batch_norm_layers(classifier):
            layer.momentum = SCRATCH_BN_MOMENTUM
    if settings.mask_weight and data.train.masks is None:
        raise ValueError("mask_weight needs training slices with lesion masks (--dataset studies)")
    # The model being fit: the classifier, or a training model around it with a mask head.
    model = with_mask_head(classifier, settings.mask_stride) if settings.mask_weight else classifier
    resample = settings.augments(data.from_studies)
    train_split, added = (
        balance_with_augmentation(data.train, n_classes, settings.seed, resample)
        if settings.balance
        else (data.train, [0] * n_classes)
    )
    if any(added):
        logger.info(
            "classes balanced with augmented images",
            extra={
                "added": dict(zip(data.class_names, added, strict=True)),
                "resampled": resample,
            },
        )
    stream = training_stream(
        train_split,
        n_classes,
        settings.batch_size,
        settings.seed + state.epoch,
        settings.random_flip,
        resample,
        settings.mask_stride if settings.mask_weight else 0,
    )
    steps = int(np.ceil(len(train_split) / settings.batch_size))
    callback = _EpochEnd(data, settings, state, run_dir, progress, classifier, select)

    if resumed:
        if state.finished:
            logger.info(
                "run already finished; loading its best weights", extra={"run_dir": str(run_dir)}
            )
        else:
            logger.info("resuming run", extra={"run_dir": str(run_dir), "epoch": state.epoch})
    progress.on_start(state.epoch, settings.epochs, steps)

    fine_tune_from = settings.fine_tune_start
    phases = ((INITIAL, 0, fine_tune_from), (FINE_TUNE, fine_tune_from, settings.epochs))
    for phase, first, last in phases:
        if state.finished or state.stopped_early or state.epoch >= last or first >= last:
            continue
        entering = state.phase != phase
        if state.epoch > 0:
            _load_weights(model, run_dir / LAST_WEIGHTS)
        if entering and phase == FINE_TUNE and first > 0 and settings.weights is None:
            # BatchNorm is about to be frozen: give it statistics of the current weights.
            recalibrate_batch_norm(classifier, stream, RECALIBRATION_BATCHES)
            _save_weights(model, run_dir / LAST_WEIGHTS)
        set_phase(classifier, phase, settings)
        if entering:
            state.phase = phase
            if phase == FINE_TUNE and first > 0:
                state.learning_rate = max(
                    state.learning_rate * settings.fine_tune_factor, settings.min_learning_rate
                )
            # A new phase is a new regime (as a second model.fit with fresh ReduceLROnPlateau
            # and EarlyStopping callbacks would be): its validation loss is compared afresh.
            state.best_val_loss = float("inf")
            state.plateau_wait = state.stop_wait = 0
            logger.info(
                "phase starts",
                extra={"phase": phase, "epoch": state.epoch, "learning_rate": state.learning_rate},
            )
        compile_for(model, state.learning_rate, settings.mask_weight)
        model.fit(
            stream,
            epochs=last,
            initial_epoch=max(first, state.epoch),
            callbacks=[callback],
            verbose=0,
            shuffle=False,  # the stream shuffles itself
        )
    if not state.finished:
        state.finished = True
        state.save(run_dir)
    if (run_dir / BEST_WEIGHTS).is_file():
        _load_weights(classifier, run_dir / BEST_WEIGHTS)
    return TrainResult(classifier, state, run_dir, fingerprint, added, callback.epoch_seconds)
