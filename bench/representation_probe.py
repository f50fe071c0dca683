"""Issue 18: is a training run's weak lesion detection the network's pooling, its features, or
its fit? Two measurements of a run's best weights on the study benchmark.

    nice -n 5 .venv/bin/python bench/representation_probe.py RUN_DIR [--out FILE.json]

1. **Fit.** The model's own anomaly score (1 − p(normal)) on its *training* slices against the
   validation slices (each split's slice table: every lesion slice, three normal ones a study),
   AUROC by the lesion's diameter on the slice. Training close to validation and both low is
   under-fitting; training far above validation is over-fitting.
2. **Linear probes.** The feature maps of three depths of the EfficientNet base (8×8, 4×4 and
   the last 4×4×1280 at 128²), pooled by their mean (what the classifier's head reads), their
   maximum (a focal finding's strongest response) or both, and a logistic regression fitted on
   the training slices' "lesion or not". Scored on every slice of the test studies like the
   worker scores a study (its slices' maximum), beside the model's own score. If max pooling
   kept a small lesion that the mean dilutes, its probe would beat the mean's.

About 2 minutes alone at 128² on 2026-12-07's machine (the feature maps of the slice tables
and the 5 760 test slices, once through the base).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from bench.lesion_visibility import load_run, run_arguments  # noqa: E402
from training.model import BASE_LAYER, OUTPUT_LAYER  # noqa: E402
from training.study_dataset import (  # noqa: E402
    StudySet,
    lesion_width_mm,
    slice_table_rows,
)
from training.study_evaluation import auroc  # noqa: E402

#: Layers of Keras' EfficientNetB0 whose outputs are probed (stride 16, 32, 32).
LAYERS = ("block5c_add", "block6d_add", "top_activation")
#: Diameter bins (mm) of a lesion on its slice.
BINS = ((0.0, 5.0), (5.0, 8.0), (8.0, 12.0), (12.0, 16.0), (16.0, 1000.0))
BATCH = 128


def _bins(score: np.ndarray, lesion: np.ndarray, normal: np.ndarray, width: np.ndarray) -> dict:
    """AUROC of the lesion slices of each diameter bin against ``normal`` slices."""

    def against_normal(inside: np.ndarray) -> float:
        return auroc(
            np.r_[score[inside], score[normal]],
            np.r_[np.ones(inside.sum()), np.zeros(normal.sum())],
        )

    out = {"all": against_normal(lesion)}
    for low, high in BINS:
        inside = lesion & (width >= low) & (width < high)
        if inside.any():
            out[f"{low:g}-{high:g} mm"] = against_normal(inside)
    return out


def _study_max(score: np.ndarray, test: StudySet) -> dict:
    """Each test study scored by its strongest slice: AUROC and sensitivity at specificity 0.90."""
    strongest = np.full(len(test.studies), -np.inf)
    np.maximum.at(strongest, test.study_index, score)
    abnormal = np.array([study.label != 0 for study in test.studies])
    cut = np.quantile(strongest[~abnormal], 0.90)
    return {
        "study_auroc": auroc(strongest, abnormal.astype(float)),
        "study_sensitivity_at_specificity_0.90": float((strongest[abnormal] > cut).mean()),
    }


def main() -> None:
    args = run_arguments()
    config, bench, model, context = load_run(args.run_dir)
    if context != "none":
        raise SystemExit("the probe reads single-slice inputs; this run was trained with context")
    import keras

    base = model.get_layer(BASE_LAYER)
    maps = keras.Model(base.inputs, [base.get_layer(name).output for name in LAYERS])
    # The base's output is top_activation's mean (pooling="avg"): the head reads it from there,
    # so each batch goes through the base once.
    head = keras.Sequential([model.get_layer("head_dense"), model.get_layer(OUTPUT_LAYER)])

    def predict(images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The anomaly score and each layer's [mean, max] pooled features of grey images."""
        scores, pooled = [], [[] for _ in LAYERS]
        for start in range(0, len(images), BATCH):
            rgb = np.repeat(images[start : start + BATCH], 3, axis=-1)
            outs = [np.asarray(out) for out in maps(rgb, training=False)]
            for k, out in enumerate(outs):
                pooled[k].append(np.concatenate([out.mean(axis=(1, 2)), out.max(axis=(1, 2))], 1))
            top_mean = outs[LAYERS.index("top_activation")].mean(axis=(1, 2))
            scores.append(1.0 - np.asarray(head(top_mean, training=False))[:, 0])
        return np.concatenate(scores), [np.concatenate(p) for p in pooled]

    fit = {}
    features = {}
    for name, split in (("train", bench.train), ("val", bench.val)):
        rows = slice_table_rows(split, config.normal_slices_per_study)
        score, pooled = predict(split.images[rows])
        lesion = split.labels[rows] != 0
        fit[name] = _bins(score, lesion, ~lesion, lesion_width_mm(split, rows))
        if name == "train":
            features = {"pooled": pooled, "lesion": lesion}

    test = bench.test
    score, pooled = predict(test.images)
    lesion = test.labels != 0
    in_normal_study = np.array([test.studies[i].label == 0 for i in test.study_index])
    width = lesion_width_mm(test, np.arange(len(test.labels)))
    probes = {
        "model's own score": {
            **_bins(score, lesion, in_normal_study, width),
            **_study_max(score, test),
        }
    }
    for k, layer in enumerate(LAYERS):
        half = features["pooled"][k].shape[1] // 2
        for pooling, columns in (("mean", slice(0, half)), ("max", slice(half, None))):
            scaler = StandardScaler().fit(features["pooled"][k][:, columns])
            probe = LogisticRegression(C=0.05, max_iter=3000).fit(
                scaler.transform(features["pooled"][k][:, columns]), features["lesion"]
            )
            probe_score = probe.decision_function(scaler.transform(pooled[k][:, columns]))
            row = _bins(probe_score, lesion, in_normal_study, width)
            probes[f"{layer}, {pooling}"] = {**row, **_study_max(probe_score, test)}
    result = {
        "run_dir": str(args.run_dir),
        "image_size": config.image_size,
        "fit_lesion_vs_normal_slices_auroc": fit,
        "test_lesion_vs_normal_study_slices_auroc": probes,
    }
    print(json.dumps(result, indent=1))  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
