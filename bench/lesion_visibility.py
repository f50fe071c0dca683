"""Issue 18: which lesions does a trained slice classifier see? Every test slice of the study
benchmark scored by a training run's best weights, and the lesion slices' anomaly scores
(1 − p(normal)) tabled by the lesion's diameter *on that slice* and its contrast, against
thresholds set on the normal studies' slices.

    nice -n 5 .venv/bin/python bench/lesion_visibility.py RUN_DIR [--out FILE.json]

Two slice thresholds, both from the test split's normal studies: the 90th percentile (a slice
specificity of 0.90), and the one a study of ``S`` slices under the *max* rule needs for a study
specificity of 0.90 (0.90 ** (1 / S) per slice, if normal slices were independent; with 24
slices, 0.9956). A lesion whose slices do not pass the second is one no study rule can flag at
specificity 0.90: what the classifier itself must learn, not what aggregation can recover.
The run's ``settings.json`` and ``dataset.json`` give the model and the benchmark (its cache).
``validation_selection`` holds the only figures from the *validation* studies: those a run on
studies ranks and records its epochs by (:func:`training.study_evaluation.epoch_selection`), so
that an epoch can be chosen from this output without looking at the test split.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from scanwatch.logs import configure_logging  # noqa: E402
from scanwatch.study_score import StudyRule  # noqa: E402
from schemas.model_signature import NORMAL_CLASS  # noqa: E402
from training.config import TrainSettings  # noqa: E402
from training.study_dataset import (  # noqa: E402
    StudyBenchmark,
    StudyConfig,
    lesion_width_mm,
    load_or_build,
    study_inputs,
)
from training.study_evaluation import (  # noqa: E402
    as_predictor,
    auroc,
    epoch_selection,
    score_studies,
)

#: Bins of a lesion slice's own diameter (mm) and of the lesion's absolute contrast.
DIAMETER_BINS = (0.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 20.0, 1000.0)
CONTRAST_BINS = (0.0, 0.15, 0.2, 0.3, 0.5, 10.0)


def run_benchmark(run_dir: Path) -> tuple[StudyConfig, StudyBenchmark]:
    """The study benchmark a training run was trained on (from its ``dataset.json``; the cache)."""
    description = json.loads((run_dir / "dataset.json").read_text())["description"]
    config = StudyConfig(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in description["config"].items()
        }
    )
    return config, load_or_build(config, TrainSettings().cache_dir)


def _model(run_dir: Path, class_names: list[str], image_size: int):  # noqa: ANN202 - keras
    from training.model import build_classifier

    settings = json.loads((run_dir / "settings.json").read_text())
    model = build_classifier(
        class_names,
        image_size=image_size,
        variant=settings["variant"],
        weights=None,
        dense_units=settings["dense_units"],
        dropout=settings["dropout"],
    )
    model.load_weights(run_dir / "best.weights.h5")
    return model, settings.get("context", "none")


def _table(
    values: np.ndarray, scores: np.ndarray, bins: tuple[float, ...], cuts: dict[str, float]
) -> list[dict]:
    rows = []
    for low, high in zip(bins[:-1], bins[1:], strict=True):
        inside = (values >= low) & (values < high)
        if not inside.any():
            continue
        row = {"low": low, "high": high, "slices": int(inside.sum())}
        row["median_score"] = float(np.median(scores[inside]))
        for name, cut in cuts.items():
            row[f"seen_{name}"] = float((scores[inside] > cut).mean())
        rows.append(row)
    return rows


def run_arguments() -> argparse.Namespace:
    """``RUN_DIR [--out FILE.json]``, the arguments of the benches that read a training run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configure_logging("training", "WARNING")
    return args


def load_run(run_dir: Path):  # noqa: ANN201 - keras
    """A training run's benchmark config and data, its best weights' model and input context."""
    config, bench = run_benchmark(run_dir)
    model, context = _model(run_dir, list(bench.class_names), config.image_size)
    return config, bench, model, context


def main() -> None:
    args = run_arguments()
    config, bench, model, context = load_run(args.run_dir)
    class_names = list(bench.class_names)
    test = bench.test
    p = as_predictor(model)(study_inputs(test, context))
    anomaly = 1.0 - p[:, class_names.index(NORMAL_CLASS)]

    studies = test.studies
    lesion_study = np.array([studies[i].label != 0 for i in test.study_index])
    normal_scores = anomaly[~lesion_study]
    slices = config.slices_per_study
    cuts = {
        "slice_spec_0.90": float(np.quantile(normal_scores, 0.90)),
        "study_spec_0.90_max_rule": float(np.quantile(normal_scores, 0.90 ** (1 / slices))),
    }
    rows = np.flatnonzero(test.labels != 0)
    diameter_a = lesion_width_mm(test, rows)
    contrast_a = np.array([abs(studies[test.study_index[row]].contrast) for row in rows])
    scores = anomaly[rows]
    # the study-level ceiling: each study's strongest slice (the max rule, as the worker scores)
    strongest = score_studies(p, test, class_names.index(NORMAL_CLASS), StudyRule("max"))
    normal_rows = np.flatnonzero(~lesion_study)
    by_position = [
        {
            "position": position,
            "median_score": float(np.median(anomaly[normal_rows[at]])),
            "over_slice_spec_0.90": float(
                (anomaly[normal_rows[at]] > cuts["slice_spec_0.90"]).mean()
            ),
        }
        for position in range(slices)
        if (at := test.position[normal_rows] == position).any()
    ]
    result = {
        "run_dir": str(args.run_dir),
        "image_size": config.image_size,
        "thresholds": cuts,
        "slice_auroc_lesion_vs_normal_study_slices": auroc(
            np.concatenate([scores, normal_scores]),
            np.concatenate([np.ones(len(scores)), np.zeros(len(normal_scores))]),
        ),
        "study_max_rule_auroc": auroc(strongest.raw, strongest.abnormal),
        # What a run on studies now chooses its kept epoch by (validation, not test).
        "validation_selection": epoch_selection(bench, TrainSettings(), context)(model),
        "normal_studies_by_position": by_position,
        "by_slice_diameter_mm": _table(diameter_a, scores, DIAMETER_BINS, cuts),
        "by_contrast": _table(contrast_a, scores, CONTRAST_BINS, cuts),
        "by_diameter_contrast_ge_0.3": _table(
            diameter_a[contrast_a >= 0.3], scores[contrast_a >= 0.3], DIAMETER_BINS, cuts
        ),
    }
    print(json.dumps(result, indent=1))  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
