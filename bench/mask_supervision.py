"""Issue 18: does telling the classifier *where* the lesion is let it see the small ones?

Every run so far learned from one label a slice ("mass", "normal", ...); on the study benchmark
the lesion slices under 12 mm stayed close to chance (`bench/training.md`). Here the same
network, from the same start and on the same slices, also learns each slice's lesion mask
(`training.study_dataset`, ``lesion_masks``) through a small head on a stride-16 feature map of
its base (`training.model.with_mask_head`, the trainer's ``--mask-weight``): dense
supervision, as detection and segmentation models are trained. The served model does not
change shape; the head is a training aid (and its map a second score, read here too).

    nice -n 5 .venv/bin/python bench/mask_supervision.py --mask-weight 1 --out FILE.json
    nice -n 5 .venv/bin/python bench/mask_supervision.py --mask-weight 0 --out FILE.json

``--mask-weight 0`` is the control: the head is there, its loss is not. Both arms: the shipped
model's weights, BatchNorm frozen, Adam at ``--learning-rate``, batch 32, left-right flips, the
classes weighted to balance (no copies), every training slice of the default study benchmark
(also lesion slices too small to see: the mask says where they are).

After each epoch, on every slice of the 160 validation studies: the lesion slices' AUROC
against every slice of the normal studies (overall and by the lesion's diameter on the slice)
and each study's strongest slice (study AUROC, sensitivity at specificity ≥ 0.90), for two
scores: the classifier's (1 − p(normal)) and the mask head's strongest cell. At the end, the
test studies the same way, with the weights of the epoch whose validation lesion-slice AUROC
(classifier's score) was best.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from training.export import load_exported_weights  # noqa: E402
from training.input_pipeline import cell_targets  # noqa: E402
from training.model import (  # noqa: E402
    BASE_LAYER,
    MASK_OUTPUT,
    MASK_STRIDE,
    OUTPUT_LAYER,
    build_classifier,
    with_mask_head,
)
from training.study_dataset import (  # noqa: E402
    PRESETS,
    StudySet,
    lesion_width_mm,
    load_or_build,
)
from training.study_evaluation import auroc, sensitivity_at_specificity  # noqa: E402
from training.train import mask_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIAMETER_BINS = ((0, 5), (5, 8), (8, 12), (12, 20), (20, 1e9))


def build(init_from: Path, image_size: int, classes: int) -> keras.Model:
    """The shipped classifier, BatchNorm frozen, inside its mask-head training model
    (``training.model.with_mask_head``: outputs ``probabilities`` and ``lesion_map``)."""
    classifier = build_classifier([f"c{i}" for i in range(classes)], image_size)
    load_exported_weights(classifier, init_from)
    for layer in classifier.get_layer(BASE_LAYER).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return with_mask_head(classifier)


def stream(split: StudySet, classes: int, batch: int, seed: int) -> tf.data.Dataset:
    labels = np.eye(classes, dtype=np.float32)[split.labels]
    counts = np.bincount(split.labels, minlength=classes)
    weights = (len(split.labels) / (classes * np.maximum(counts, 1)))[split.labels]
    assert split.masks is not None
    data = tf.data.Dataset.from_tensor_slices(
        (split.images, labels, cell_targets(split.masks, MASK_STRIDE), weights.astype(np.float32))
    )

    def flip(image: tf.Tensor, label: tf.Tensor, cells: tf.Tensor, weight: tf.Tensor) -> Any:
        mirrored = tf.random.uniform(()) < 0.5
        image = tf.cond(mirrored, lambda: tf.reverse(image, [1]), lambda: image)
        cells = tf.cond(mirrored, lambda: tf.reverse(cells, [1]), lambda: cells)
        rgb = tf.repeat(image, 3, axis=-1)
        return (
            rgb,
            {OUTPUT_LAYER: label, MASK_OUTPUT: cells},
            {OUTPUT_LAYER: weight, MASK_OUTPUT: tf.ones(())},
        )

    return (
        data.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
        .map(flip, num_parallel_calls=2)
        .batch(batch)
        .prefetch(2)
    )


def scores(model: keras.Model, split: StudySet) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: 1 − p(normal), and the mask head's strongest cell."""
    anomaly, where = [], []
    for start in range(0, len(split.images), 128):
        rgb = np.repeat(split.images[start : start + 128], 3, axis=-1)
        out = model(rgb, training=False)
        anomaly.append(1.0 - out[OUTPUT_LAYER].numpy()[:, 0])
        where.append(out[MASK_OUTPUT].numpy().max(axis=(1, 2, 3)))
    return np.concatenate(anomaly), np.concatenate(where)


def measure(split: StudySet, score: np.ndarray) -> dict[str, Any]:
    """Lesion slices against the normal studies' slices (by the lesion's width on the slice),
    and each study's strongest slice."""
    normal_study = np.array([info.label == 0 for info in split.studies])[split.study_index]
    lesion = split.labels != 0
    rows = np.flatnonzero(lesion | normal_study)
    width = lesion_width_mm(split, rows)
    out: dict[str, Any] = {"lesion_slice_auroc": auroc(score[rows], lesion[rows])}
    for low, high in DIAMETER_BINS:
        keep = ~lesion[rows] | ((width >= low) & (width < high))
        out[f"auroc_{low}_{high:g}mm"] = auroc(score[rows][keep], lesion[rows][keep])
    per_study = np.array([score[split.study_index == i].max() for i in range(len(split.studies))])
    abnormal = np.array([info.label != 0 for info in split.studies])
    out["study_auroc"] = auroc(per_study, abnormal)
    out["study_sens_at_spec90"] = sensitivity_at_specificity(per_study, abnormal, 0.90)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask-weight", type=float, required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow's intra-op threads")
    parser.add_argument(
        "--init-from", type=Path, default=ROOT / "training/default_model/saved_model"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=PRESETS, default="default", help="tiny: a smoke run")
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    config = replace(PRESETS[args.preset], lesion_masks=True)
    bench = load_or_build(config, ROOT / "var/training/cache")
    classes = len(bench.class_names)
    model = build(args.init_from, bench.train.images.shape[1], classes)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss={OUTPUT_LAYER: "categorical_crossentropy", MASK_OUTPUT: mask_loss},
        loss_weights={OUTPUT_LAYER: 1.0, MASK_OUTPUT: args.mask_weight},
    )
    train = stream(bench.train, classes, 32, seed=0)
    record: dict[str, Any] = {"arguments": {k: str(v) for k, v in vars(args).items()}}
    record["epochs"], best, best_weights = [], -1.0, model.get_weights()
    for epoch in range(1, args.epochs + 1):
        started = time.monotonic()
        history = model.fit(train, epochs=1, verbose=0).history
        anomaly, where = scores(model, bench.val)
        row = {
            "epoch": epoch,
            "seconds": round(time.monotonic() - started, 1),
            "loss": {k: round(v[-1], 4) for k, v in history.items()},
            "val_classifier": measure(bench.val, anomaly),
            "val_mask_head": measure(bench.val, where),
        }
        record["epochs"].append(row)
        print(json.dumps(row), flush=True)  # noqa: T201
        if row["val_classifier"]["lesion_slice_auroc"] > best:
            best, best_weights = row["val_classifier"]["lesion_slice_auroc"], model.get_weights()
            record["best_epoch"] = epoch
        args.out.write_text(json.dumps(record, indent=1))
    model.set_weights(best_weights)
    anomaly, where = scores(model, bench.test)
    record["test_classifier"] = measure(bench.test, anomaly)
    record["test_mask_head"] = measure(bench.test, where)
    kept = ("best_epoch", "test_classifier", "test_mask_head")
    print(json.dumps({k: record[k] for k in kept}))  # noqa: T201
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
