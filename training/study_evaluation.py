"""Study-level evaluation: the aggregation, calibration and operating point a model ships with.

Everything is measured with :func:`scanwatch.study_score.study_result`, the function the worker
scores every study with, so the numbers here are the numbers the worker will produce.

:func:`evaluate_study_benchmark` takes a trained classifier and a study benchmark and decides,
on the **validation** studies only:

1. the slice **temperature** (:func:`training.calibration.fit_temperature`), baked into the
   exported graph, so every later step sees the probabilities the served model returns;
2. the **aggregation** among :data:`CANDIDATE_RULES`, by :data:`SELECTION_CRITERION`: the
   largest study sensitivity at specificity ≥ ``aggregation_min_specificity`` (the ROC point, not
   a threshold), ties broken by study AUROC, then by the simpler rule (the order of
   :data:`CANDIDATE_RULES`);
3. the study **calibration** (Platt scaling on the logit of the rule's raw score);
4. the **operating point**: the threshold that meets "study sensitivity ≥ S for lesions of
   diameter ≥ D mm" (:class:`OperatingTarget`); a study is abnormal when its calibrated score is
   *above* the threshold, as the worker decides (``inference_worker.fhir_resources``).

It then reports on the **test** studies (:func:`study_report`): AUROC, sensitivity and
specificity at the operating point, sensitivity by lesion diameter and by |contrast| bin (and the
smallest diameter bin from which sensitivity stays ≥ 0.9), a FROC-style curve (a detection is
true when the study is flagged and its strongest slice shows the lesion), the aggregation table,
and slice- and study-level reliability with the ECE before and after calibration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score, roc_curve

from scanwatch.imaging import NO_CONTEXT
from scanwatch.model_registry import PROMOTION_MIN_SPECIFICITY, STUDY_PROMOTION_METRICS
from scanwatch.study_score import LEGACY_RULE, StudyRule, study_result
from schemas.model_signature import NORMAL_CLASS
from training.calibration import (
    apply_temperature,
    fit_platt,
    fit_temperature,
    negative_log_likelihood,
    reliability,
    top_label_reliability,
)

logger = logging.getLogger(__name__)

#: The aggregations compared on validation, simplest first (the order breaks the last ties).
CANDIDATE_RULES: tuple[StudyRule, ...] = (
    StudyRule("mean"),
    StudyRule("max"),
    StudyRule("top_k_mean", k=2),
    StudyRule("top_k_mean", k=3),
    StudyRule("top_k_mean", k=5),
    StudyRule("noisy_or"),
)
SELECTION_CRITERION = (
    "largest validation study sensitivity at specificity >= {specificity:.2f} (ROC point), "
    "then largest validation study AUROC, then the simpler rule "
    "(mean < max < top-2 < top-3 < top-5 mean < noisy-OR)"
)
#: Lesion diameter bins of the report (mm): the benchmark draws 4-40 mm, log-uniformly.
DIAMETER_EDGES_MM = (0.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, math.inf)
#: |contrast| bins of the report (relative to the tissue around the lesion).
CONTRAST_EDGES = (0.0, 0.15, 0.2, 0.3, 0.5, math.inf)
#: "Sensitivity stays at least this" for the smallest reliable diameter bin.
RELIABLE_SENSITIVITY = 0.9
#: False positives per study at which the FROC curve's sensitivity is quoted.
FROC_RATES = (0.05, 0.1, 0.25, 0.5, 1.0)

STUDY_RELIABILITY_PNG = "study_reliability.png"
STUDY_FROC_PNG = "study_froc.png"
STUDY_BINS_PNG = "study_sensitivity_bins.png"


# -- what a study benchmark looks like (training.study_dataset builds them) --------------------


class StudyInfoLike(Protocol):
    @property
    def study_id(self) -> str: ...
    @property
    def label(self) -> int: ...
    @property
    def diameter_mm(self) -> float: ...
    @property
    def contrast(self) -> float: ...
    @property
    def lesion_slices(self) -> tuple[int, ...]: ...


class StudySetLike(Protocol):
    @property
    def images(self) -> np.ndarray: ...
    @property
    def labels(self) -> np.ndarray: ...
    @property
    def study_index(self) -> np.ndarray: ...
    @property
    def position(self) -> np.ndarray: ...
    @property
    def studies(self) -> Sequence[StudyInfoLike]: ...


class StudyBenchmarkLike(Protocol):
    @property
    def class_names(self) -> tuple[str, ...]: ...
    @property
    def val(self) -> StudySetLike: ...
    @property
    def test(self) -> StudySetLike: ...


class TargetSettings(Protocol):
    """The fields of :class:`training.config.TrainSettings` this module reads."""

    @property
    def target_sensitivity(self) -> float: ...
    @property
    def target_min_diameter_mm(self) -> float: ...
    @property
    def aggregation_min_specificity(self) -> float: ...
    @property
    def batch_size(self) -> int: ...


# -- scoring studies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyScores:
    """Every study of a split scored under one rule (arrays indexed by study)."""

    raw: npt.NDArray[np.float64]  # aggregated, before calibration
    logit: npt.NDArray[np.float64]  # logit(raw) from the aggregation: ranks what raw rounds to 1
    score: npt.NDArray[np.float64]  # calibrated: compared with the threshold
    strongest: npt.NDArray[np.int64]  # position of the strongest slice
    abnormal: npt.NDArray[np.bool_]  # the study has a lesion
    hit: npt.NDArray[np.bool_]  # the strongest slice is one of the lesion's slices
    diameter_mm: npt.NDArray[np.float64]
    contrast: npt.NDArray[np.float64]


def study_members(split: StudySetLike) -> list[npt.NDArray[np.int64]]:
    """Row indices of each study's slices, in position order (the order the worker scores)."""
    order = np.lexsort((split.position, split.study_index))
    bounds = np.searchsorted(split.study_index[order], np.arange(len(split.studies) + 1))
    members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    empty = [split.studies[i].study_id for i, m in enumerate(members) if len(m) == 0]
    if empty:
        raise ValueError(f"studies without slices: {', '.join(empty[:5])}")
    return members


def score_studies(
    probabilities: npt.ArrayLike, split: StudySetLike, normal_index: int, rule: StudyRule
) -> StudyScores:
    """Each study's result under ``rule`` (:func:`study_result`, as the worker computes it)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) != len(split.labels):
        raise ValueError(f"{len(p)} predictions for {len(split.labels)} slices")
    raw, logit, score, strongest, hit = [], [], [], [], []
    for index, rows in enumerate(study_members(split)):
        result = study_result(p[rows], normal_index, rule)
        position = int(split.position[rows[result.strongest]])
        raw.append(result.raw_score)
        logit.append(result.raw_logit)
        score.append(result.anomaly_score)
        strongest.append(position)
        hit.append(position in split.studies[index].lesion_slices)
    studies = split.studies
    return StudyScores(
        raw=np.array(raw),
        logit=np.array(logit),
        score=np.array(score),
        strongest=np.array(strongest, dtype=np.int64),
        abnormal=np.array([s.label != normal_index for s in studies], dtype=bool),
        hit=np.array(hit, dtype=bool),
        diameter_mm=np.array([s.diameter_mm for s in studies], dtype=np.float64),
        contrast=np.array([s.contrast for s in studies], dtype=np.float64),
    )


# -- metrics -----------------------------------------------------------------------------------


def auroc(scores: npt.ArrayLike, abnormal: npt.ArrayLike) -> float | None:
    y = np.asarray(abnormal, dtype=bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def sensitivity_at_specificity(
    scores: npt.ArrayLike, abnormal: npt.ArrayLike, min_specificity: float
) -> float | None:
    """The best sensitivity of any threshold whose specificity is at least ``min_specificity``."""
    y = np.asarray(abnormal, dtype=bool)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, np.asarray(scores, dtype=np.float64))
    allowed = fpr <= 1.0 - min_specificity + 1e-12
    return float(tpr[allowed].max())


def flagged(scores: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """The worker's decision: abnormal when the score is above the threshold."""
    return np.asarray(scores, dtype=np.float64) > threshold


def _rate(values: npt.NDArray[np.bool_]) -> float | None:
    return float(values.mean()) if values.size else None


@dataclass(frozen=True)
class OperatingTarget:
    """What the threshold is chosen for: study sensitivity ≥ ``sensitivity`` over validation
    studies whose lesion is at least ``min_diameter_mm`` across."""

    sensitivity: float = 0.95
    min_diameter_mm: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.sensitivity <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {self.sensitivity}")
        if self.min_diameter_mm < 0:
            raise ValueError(f"minimum diameter must be >= 0 mm, got {self.min_diameter_mm}")

    def describe(self) -> str:
        return (
            f"study sensitivity >= {self.sensitivity:g} for lesions >= {self.min_diameter_mm:g} "
            "mm (highest threshold meeting it on validation studies)"
        )


def choose_threshold(scores: StudyScores, target: OperatingTarget) -> float:
    """The highest threshold at which ``target`` holds on these (validation) studies.

    With ``score > threshold`` flagged, the target holds for every threshold below the
    ``ceil(S·n)``-th largest score of the n target studies, and the validation decisions are the
    same for every threshold between it and the next lower score of any study: the threshold is
    the middle of that interval, so that rounding in the served graph cannot flip a study at
    its edge.
    """
    targeted = scores.abnormal & (scores.diameter_mm >= target.min_diameter_mm)
    n = int(targeted.sum())
    if n == 0:
        raise ValueError(
            f"no validation study has a lesion of at least {target.min_diameter_mm:g} mm: "
            "the operating point cannot be chosen (lower the minimum diameter)"
        )
    needed = math.ceil(target.sensitivity * n - 1e-9)
    edge = float(np.sort(scores.score[targeted])[::-1][needed - 1])
    below = scores.score[scores.score < edge]
    return (edge + float(below.max())) / 2 if below.size else edge / 2


def decision(scores: StudyScores, threshold: float, min_diameter_mm: float) -> dict[str, Any]:
    """Sensitivity and specificity of the decision at ``threshold``."""
    f = flagged(scores.score, threshold)
    targeted = scores.abnormal & (scores.diameter_mm >= min_diameter_mm)
    return {
        "threshold": threshold,
        "studies": int(len(f)),
        "abnormal_studies": int(scores.abnormal.sum()),
        "normal_studies": int((~scores.abnormal).sum()),
        "sensitivity": _rate(f[scores.abnormal]),
        "specificity": _rate(~f[~scores.abnormal]),
        "target_studies": int(targeted.sum()),
        "target_sensitivity": _rate(f[targeted]),
    }


def sensitivity_by_bin(
    values: npt.ArrayLike, scores: StudyScores, threshold: float, edges: Sequence[float]
) -> list[dict[str, Any]]:
    """Sensitivity at ``threshold`` of the lesion studies in each ``[low, high)`` bin of
    ``values`` (empty bins are left out)."""
    v = np.asarray(values, dtype=np.float64)
    f = flagged(scores.score, threshold)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        members = scores.abnormal & (v >= low) & (v < high)
        if members.any():
            rows.append(
                {
                    "low": low,
                    "high": None if math.isinf(high) else high,
                    "studies": int(members.sum()),
                    "detected": int(f[members].sum()),
                    "sensitivity": float(f[members].mean()),
                }
            )
    return rows


def smallest_reliable_bin(
    rows: Sequence[dict[str, Any]], level: float = RELIABLE_SENSITIVITY
) -> float | None:
    """The lower edge of the smallest bin from which every larger bin keeps sensitivity ≥
    ``level`` (None: not even the largest bin does)."""
    smallest = None
    for row in reversed(rows):
        if row["sensitivity"] < level:
            break
        smallest = row["low"]
    return smallest


def froc(scores: StudyScores) -> dict[str, Any]:
    """A FROC-style curve over every threshold: the share of lesion studies *detected*
    (flagged and their strongest slice shows the lesion) against false positives per study
    (flagged normal studies, and flagged lesion studies whose strongest slice misses it)."""
    thresholds = np.unique(scores.score)[::-1]
    n = len(scores.score)
    lesions = max(int(scores.abnormal.sum()), 1)
    fp_rate, sensitivity = [0.0], [0.0]
    for t in thresholds:
        f = scores.score >= t
        true = f & scores.abnormal & scores.hit
        fp_rate.append(float((f & ~true).sum() / n))
        sensitivity.append(float(true.sum() / lesions))
    at = {}
    for rate in FROC_RATES:
        reachable = [s for fp, s in zip(fp_rate, sensitivity, strict=True) if fp <= rate + 1e-12]
        at[f"{rate:g}"] = max(reachable)
    return {
        "fp_per_study": fp_rate,
        "sensitivity": sensitivity,
        "sensitivity_at_fp_per_study": at,
        "localised": _rate(scores.hit[scores.abnormal]),
    }


def rule_row(
    rule: StudyRule, scores: StudyScores, min_specificity: float, split: str
) -> dict[str, Any]:
    return {
        "rule": rule.name,
        f"{split}_auroc": auroc(scores.logit, scores.abnormal),
        f"{split}_sensitivity_at_specificity": sensitivity_at_specificity(
            scores.logit, scores.abnormal, min_specificity
        ),
    }


def choose_rule(rows: Sequence[dict[str, Any]]) -> int:
    """Index of the row :data:`SELECTION_CRITERION` picks (rows in :data:`CANDIDATE_RULES`'
    order, with ``val_sensitivity_at_specificity`` and ``val_auroc``)."""

    def key(index: int) -> tuple[float, float, int]:
        row = rows[index]
        sensitivity = row["val_sensitivity_at_specificity"]
        area = row["val_auroc"]
        return (
            round(-1.0 if sensitivity is None else sensitivity, 9),
            round(-1.0 if area is None else area, 9),
            -index,
        )

    return max(range(len(rows)), key=key)


# -- the whole evaluation ----------------------------------------------------------------------


class StudyEvaluation(NamedTuple):
    """What :func:`evaluate_study_benchmark` decided, and its report."""

    rule: StudyRule
    threshold: float
    temperature: float
    report: dict[str, Any]


Predictor = Callable[[np.ndarray], np.ndarray]


def as_predictor(model_or_predict: Any, batch_size: int = 64) -> Predictor:
    """``images → probabilities`` of a Keras model (batched through the inference pipeline, grey
    images expanded to RGB) or of a callable already."""
    if hasattr(model_or_predict, "predict"):
        from training.input_pipeline import inference_stream

        def predict(images: np.ndarray) -> np.ndarray:
            stream = inference_stream(images, batch_size)
            return np.asarray(model_or_predict.predict(stream, verbose=0))

        return predict
    if callable(model_or_predict):
        return lambda images: np.asarray(model_or_predict(images))
    raise TypeError(f"need a Keras model or a callable, got {type(model_or_predict).__name__}")


def evaluate_study_benchmark(
    model_or_predict: Any,
    benchmark: StudyBenchmarkLike,
    settings: TargetSettings,
    context: str = NO_CONTEXT,
) -> StudyEvaluation:
    """Choose temperature, aggregation, calibration and threshold on ``benchmark.val``; report
    on ``benchmark.test`` (see the module docstring). ``model_or_predict`` returns the trained
    classifier's probabilities, *without* temperature (a Keras model or a callable).
    ``context``: the input channels the model was trained with
    (:func:`training.study_dataset.study_inputs`), recorded in the returned rule."""
    from training.study_dataset import study_inputs

    predict = as_predictor(model_or_predict, settings.batch_size)
    normal = list(benchmark.class_names).index(NORMAL_CLASS)
    val, test = benchmark.val, benchmark.test
    target, fallback = _target(settings, val, normal)
    val_raw = predict(study_inputs(val, context))
    test_raw = predict(study_inputs(test, context))

    temperature = fit_temperature(val_raw, val.labels)
    val_p = apply_temperature(val_raw, temperature)
    test_p = apply_temperature(test_raw, temperature)

    min_spec = settings.aggregation_min_specificity
    rows = _aggregation_table(val_p, test_p, benchmark, normal, min_spec)
    chosen = CANDIDATE_RULES[choose_rule(rows)]
    for row in rows:
        row["chosen"] = row["rule"] == chosen.name

    calibration = fit_platt(
        score_studies(val_p, val, normal, chosen).logit,
        np.array([s.label != normal for s in val.studies]),
    )
    rule = replace(
        chosen, calibration=calibration, operating_point=target.describe(), context=context
    )
    val_scores = score_studies(val_p, val, normal, rule)
    threshold = choose_threshold(val_scores, target)
    test_scores = score_studies(test_p, test, normal, rule)

    report = study_report(
        rule=rule,
        threshold=threshold,
        target=target,
        min_specificity=min_spec,
        val_scores=val_scores,
        test_scores=test_scores,
        rows=rows,
    )
    report["target"]["fallback"] = fallback
    report["temperature"] = {
        "value": temperature,
        "val_nll_before": negative_log_likelihood(val_raw, val.labels),
        "val_nll_after": negative_log_likelihood(val_p, val.labels),
        "test_nll_before": negative_log_likelihood(test_raw, test.labels),
        "test_nll_after": negative_log_likelihood(test_p, test.labels),
        "test_reliability_before": top_label_reliability(test_raw, test.labels).as_dict(),
        "test_reliability_after": top_label_reliability(test_p, test.labels).as_dict(),
    }
    return StudyEvaluation(rule, threshold, temperature, report)


def _target(
    settings: TargetSettings, val: StudySetLike, normal: int
) -> tuple[OperatingTarget, str | None]:
    """The settings' operating target, widened to every lesion (and why) when no validation
    lesion is that large; ValueError when validation lacks normal or lesion studies."""
    target = OperatingTarget(settings.target_sensitivity, settings.target_min_diameter_mm)
    lesions = [s.diameter_mm for s in val.studies if s.label != normal]
    if not lesions or len(lesions) == len(val.studies):
        raise ValueError("the validation studies need both normal and lesion studies")
    if max(lesions) >= target.min_diameter_mm:
        return target, None
    # A tiny benchmark may have no lesion that large: target every lesion, and say so.
    fallback = (
        f"no validation lesion is >= {target.min_diameter_mm:g} mm: the target covers every lesion"
    )
    logger.warning("operating point target widened", extra={"reason": fallback})
    return OperatingTarget(target.sensitivity, 0.0), fallback


def _aggregation_table(
    val_p: np.ndarray,
    test_p: np.ndarray,
    benchmark: StudyBenchmarkLike,
    normal: int,
    min_spec: float,
) -> list[dict[str, Any]]:
    val_rows = _rule_rows(val_p, benchmark.val, normal, min_spec, "val")
    test_rows = _rule_rows(test_p, benchmark.test, normal, min_spec, "test")
    return [v | t for v, t in zip(val_rows, test_rows, strict=True)]


def _rule_rows(
    p: np.ndarray, split: StudySetLike, normal: int, min_spec: float, name: str
) -> list[dict[str, Any]]:
    """:func:`rule_row` of every candidate rule on ``split``, in :data:`CANDIDATE_RULES`' order."""
    return [
        rule_row(rule, score_studies(p, split, normal, rule), min_spec, name)
        for rule in CANDIDATE_RULES
    ]


#: What :func:`epoch_selection` measures on the validation studies. The first ranks the epochs;
#: the others are recorded beside it.
SELECTION_METRICS = (
    "val_lesion_slice_auroc",
    "val_study_sensitivity_at_specificity",
    "val_study_auroc",
)


def epoch_selection(
    benchmark: StudyBenchmarkLike, settings: TargetSettings, context: str = NO_CONTEXT
) -> Callable[[Any], dict[str, float]]:
    """How a run on ``benchmark``'s slices chooses the epoch whose weights it keeps: by how well
    its anomaly score (1 - p(normal)) tells the validation studies' lesion slices from every
    slice of their normal studies (AUROC), not by the validation slices' macro-F1, which ranks
    the lesion classes a study model confuses with one another.

    That slice AUROC is what every study rule builds on, measured on thousands of slices. The
    study figures themselves (:data:`SELECTION_CRITERION`'s sensitivity and AUROC of the rule it
    would choose) are recorded but do not rank: on 160 validation studies their noise is larger
    than the differences between epochs (``bench/training.md``, "Which epoch to keep").

    The returned function scores a Keras model (or a predict callable) and returns
    :data:`SELECTION_METRICS`, before temperature scaling (fitted once, after training); -1
    where a figure is undefined."""
    from training.study_dataset import study_inputs

    val = benchmark.val
    normal = list(benchmark.class_names).index(NORMAL_CLASS)
    images = study_inputs(val, context)
    lesion = val.labels != normal
    of_normal_study = np.array([val.studies[i].label == normal for i in val.study_index])

    def score(model: Any) -> dict[str, float]:
        p = as_predictor(model, settings.batch_size)(images)
        anomaly = 1.0 - p[:, normal]
        slices = auroc(
            np.concatenate([anomaly[lesion], anomaly[of_normal_study]]),
            np.concatenate([np.ones(lesion.sum()), np.zeros(of_normal_study.sum())]),
        )
        rows = _rule_rows(p, val, normal, settings.aggregation_min_specificity, "val")
        best = rows[choose_rule(rows)]
        values = (slices, best["val_sensitivity_at_specificity"], best["val_auroc"])
        return {
            name: -1.0 if value is None else float(value)
            for name, value in zip(SELECTION_METRICS, values, strict=True)
        }

    return score


def evaluate_served_rule(
    predict: Predictor,
    benchmark: StudyBenchmarkLike,
    rule: StudyRule,
    settings: TargetSettings,
    threshold: float | None = None,
) -> StudyEvaluation:
    """The study report of a published model (``predict``: its served probabilities, temperature
    included) under its own ``rule`` (whose ``context`` says how its inputs are built).

    ``threshold`` given: reported at it (``python -m training evaluate``). None: the operating
    point is chosen again on ``benchmark.val`` for the settings' target, aggregation and
    calibration kept (``python -m training operating-point``: an operator's own target or data,
    without retraining); the returned rule then states the new target.
    """
    normal = list(benchmark.class_names).index(NORMAL_CLASS)
    val, test = benchmark.val, benchmark.test
    target, fallback = _target(settings, val, normal)
    from training.study_dataset import study_inputs

    val_p = predict(study_inputs(val, rule.context))
    test_p = predict(study_inputs(test, rule.context))
    rechosen = threshold is None
    if threshold is None:
        rule = replace(rule, operating_point=target.describe())
        threshold = choose_threshold(score_studies(val_p, val, normal, rule), target)
    min_spec = settings.aggregation_min_specificity
    rows = _aggregation_table(val_p, test_p, benchmark, normal, min_spec)
    for row in rows:
        row["chosen"] = row["rule"] == rule.name
    report = study_report(
        rule=rule,
        threshold=threshold,
        target=target,
        min_specificity=min_spec,
        val_scores=score_studies(val_p, val, normal, rule),
        test_scores=score_studies(test_p, test, normal, rule),
        rows=rows,
    )
    report["target"]["fallback"] = fallback
    if not rechosen:
        # Reported at the model's own threshold: say what it was chosen for, not the settings'.
        stated = rule.operating_point or "the model's threshold (no stated target)"
        report["target"]["text"] = stated
    return StudyEvaluation(rule, threshold, 1.0, report)


def study_report(
    *,
    rule: StudyRule,
    threshold: float,
    target: OperatingTarget,
    min_specificity: float,
    val_scores: StudyScores,
    test_scores: StudyScores,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The study-level section of the evaluation report (JSON-ready)."""
    diameter_rows = sensitivity_by_bin(
        test_scores.diameter_mm, test_scores, threshold, DIAMETER_EDGES_MM
    )
    return {
        "rule": {
            "aggregation": rule.aggregation,
            "k": rule.k,
            "name": rule.name,
            "calibration": {
                "slope": rule.calibration.slope,
                "intercept": rule.calibration.intercept,
            },
            "operating_point": rule.operating_point,
            "json": rule.to_json(),
        },
        "selection_criterion": SELECTION_CRITERION.format(specificity=min_specificity),
        "aggregation_table": rows,
        "target": {
            "sensitivity": target.sensitivity,
            "min_diameter_mm": target.min_diameter_mm,
            "text": target.describe(),
        },
        "threshold": threshold,
        "validation": decision(val_scores, threshold, target.min_diameter_mm),
        "test": {
            **decision(test_scores, threshold, target.min_diameter_mm),
            "auroc": auroc(test_scores.score, test_scores.abnormal),
            "sensitivity_at_specificity": sensitivity_at_specificity(
                test_scores.score, test_scores.abnormal, min_specificity
            ),
            "min_specificity": min_specificity,
            "roc": _roc_points(test_scores),
            "promotion": dict(
                zip(
                    STUDY_PROMOTION_METRICS,
                    promotion_metrics_of(test_scores),
                    strict=True,
                )
            ),
        },
        "by_diameter_mm": diameter_rows,
        "smallest_reliable_diameter_mm": smallest_reliable_bin(diameter_rows),
        "by_abs_contrast": sensitivity_by_bin(
            np.abs(test_scores.contrast), test_scores, threshold, CONTRAST_EDGES
        ),
        "froc": froc(test_scores),
        "calibration": {
            "test_reliability_before": reliability(
                np.clip(test_scores.raw, 0, 1), test_scores.abnormal
            ).as_dict(),
            "test_reliability_after": reliability(
                test_scores.score, test_scores.abnormal
            ).as_dict(),
        },
    }


def _roc_points(scores: StudyScores) -> dict[str, list[float]]:
    if scores.abnormal.all() or not scores.abnormal.any():
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(scores.abnormal, scores.score)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def promotion_metrics_of(scores: StudyScores) -> tuple[float, float]:
    """The registry's study-level promotion metrics (:data:`STUDY_PROMOTION_METRICS`):
    sensitivity at specificity ≥ :data:`PROMOTION_MIN_SPECIFICITY`, then AUROC."""
    sensitivity = sensitivity_at_specificity(
        scores.score, scores.abnormal, PROMOTION_MIN_SPECIFICITY
    )
    area = auroc(scores.score, scores.abnormal)
    if sensitivity is None or area is None:
        raise ValueError("the study test split needs both normal and lesion studies")
    return sensitivity, area


def promotion_metrics(
    probabilities: npt.ArrayLike,
    split: StudySetLike,
    normal_index: int,
    rule: StudyRule = LEGACY_RULE,
) -> tuple[float, float]:
    """:func:`promotion_metrics_of` the studies of ``split`` scored under ``rule`` (a served
    version is measured with its own rule; :data:`LEGACY_RULE` for a model without one)."""
    return promotion_metrics_of(score_studies(probabilities, split, normal_index, rule))


def flat_study_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The study numbers a registry row carries (promotion reads the first two)."""
    test = report["test"]
    values = {
        **test["promotion"],
        "study_auroc_calibrated": test["auroc"],
        "study_sensitivity": test["sensitivity"],
        "study_specificity": test["specificity"],
        "study_threshold": report["threshold"],
    }
    return {k: float(v) for k, v in values.items() if v is not None}


# -- Markdown and plots ------------------------------------------------------------------------


def _n(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _bin_label(row: dict[str, Any], unit: str = "") -> str:
    high = row["high"]
    return f"≥ {row['low']:g}{unit}" if high is None else f"{row['low']:g}–{high:g}{unit}"


def study_markdown(report: dict[str, Any]) -> str:
    """The study-level section of ``evaluation.md``."""
    rule, test, val = report["rule"], report["test"], report["validation"]
    temperature = report.get("temperature")
    lines = [
        "## Study level (held-out test studies)",
        "",
        f"Rule: **{rule['name']}** of the slice anomaly scores, Platt calibration slope "
        f"{rule['calibration']['slope']:.3f}, intercept {rule['calibration']['intercept']:.3f}.",
        f"Operating point: {report['target']['text']} → threshold **{report['threshold']:.4f}** "
        "(a study is abnormal when its calibrated score is above it)"
        + (f"; {report['target']['fallback']}." if report["target"].get("fallback") else "."),
        "",
        f"Test: {test['studies']} studies ({test['abnormal_studies']} with a lesion, "
        f"{test['normal_studies']} normal). Study AUROC **{_n(test['auroc'])}**; at the "
        f"operating point sensitivity **{_n(test['sensitivity'])}**, specificity on normal "
        f"studies **{_n(test['specificity'])}**; sensitivity for lesions ≥ "
        f"{report['target']['min_diameter_mm']:g} mm {_n(test['target_sensitivity'])} "
        f"({test['target_studies']} studies). Best sensitivity at specificity ≥ "
        f"{test['min_specificity']:.2f}: {_n(test['sensitivity_at_specificity'])}.",
        f"Validation at the same threshold: sensitivity {_n(val['sensitivity'])}, specificity "
        f"{_n(val['specificity'])}, lesions ≥ {report['target']['min_diameter_mm']:g} mm "
        f"{_n(val['target_sensitivity'])}.",
        "",
        f"Aggregation chosen on validation by: {report['selection_criterion']}.",
        "",
        "| rule | val sens. @ spec | val AUROC | test sens. @ spec | test AUROC | chosen |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in report["aggregation_table"]:
        lines.append(
            f"| {row['rule']} | {_n(row['val_sensitivity_at_specificity'])} | "
            f"{_n(row['val_auroc'])} | {_n(row['test_sensitivity_at_specificity'])} | "
            f"{_n(row['test_auroc'])} | {'✔' if row['chosen'] else ''} |"
        )
    smallest = report["smallest_reliable_diameter_mm"]
    lines += [
        "",
        "Sensitivity at the operating point by lesion diameter (mm) — smallest bin from which "
        f"it stays ≥ {RELIABLE_SENSITIVITY}: "
        + ("none" if smallest is None else f"**≥ {smallest:g} mm**"),
        "",
        "| diameter | studies | detected | sensitivity |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in report["by_diameter_mm"]:
        lines.append(
            f"| {_bin_label(row, ' mm')} | {row['studies']} | {row['detected']} | "
            f"{row['sensitivity']:.3f} |"
        )
    lines += [
        "",
        "| abs. contrast | studies | detected | sensitivity |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in report["by_abs_contrast"]:
        lines.append(
            f"| {_bin_label(row)} | {row['studies']} | {row['detected']} | "
            f"{row['sensitivity']:.3f} |"
        )
    at = report["froc"]["sensitivity_at_fp_per_study"]
    lines += [
        "",
        "FROC (a detection is true when the study is flagged and its strongest slice shows the "
        "lesion; the strongest slice is on the lesion in "
        f"{_n(report['froc']['localised'])} of lesion studies): "
        + ", ".join(f"{_n(s)} at {r} FP/study" for r, s in at.items())
        + ".",
        "",
        "Calibration (ECE, 15 bins, test): study score "
        f"{report['calibration']['test_reliability_before']['ece']:.4f} raw → "
        f"{report['calibration']['test_reliability_after']['ece']:.4f} calibrated",
    ]
    if temperature:
        lines[-1] += (
            f"; slices (top-class confidence) {temperature['test_reliability_before']['ece']:.4f}"
            f" → {temperature['test_reliability_after']['ece']:.4f} with temperature "
            f"{temperature['value']:.3f} (NLL: validation {temperature['val_nll_before']:.4f} → "
            f"{temperature['val_nll_after']:.4f}, test {temperature['test_nll_before']:.4f} → "
            f"{temperature['test_nll_after']:.4f})"
        )
    lines[-1] += "."
    return "\n".join(lines) + "\n"


def _reliability_axis(axis: Any, before: dict[str, Any], after: dict[str, Any], title: str) -> None:
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect")
    for data, label, marker in ((before, "before", "o"), (after, "after", "s")):
        points = [(b["confidence"], b["frequency"]) for b in data["bins"] if b["count"]]
        if points:
            x, y = zip(*points, strict=True)
            axis.plot(x, y, marker=marker, label=f"{label} (ECE {data['ece']:.3f})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel("mean predicted probability")
    axis.set_ylabel("observed frequency")
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize="small")


def write_study_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Reliability diagrams, the FROC and ROC curves, sensitivity by bin (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    temperature = report.get("temperature")
    panels = 2 if temperature else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), squeeze=False)
    if temperature:
        _reliability_axis(
            axes[0][0],
            temperature["test_reliability_before"],
            temperature["test_reliability_after"],
            f"slices: top-class confidence (T = {temperature['value']:.2f})",
        )
    _reliability_axis(
        axes[0][-1],
        report["calibration"]["test_reliability_before"],
        report["calibration"]["test_reliability_after"],
        f"studies: P(abnormal), {report['rule']['name']} + Platt",
    )
    fig.tight_layout()
    fig.savefig(out_dir / STUDY_RELIABILITY_PNG, dpi=100)
    plt.close(fig)
    written.append(out_dir / STUDY_RELIABILITY_PNG)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    roc = report["test"]["roc"]
    left.plot(roc["fpr"], roc["tpr"], label=f"AUROC {_n(report['test']['auroc'])}")
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    point = report["test"]
    if point["specificity"] is not None and point["sensitivity"] is not None:
        left.plot(
            [1 - point["specificity"]],
            [point["sensitivity"]],
            "o",
            color="red",
            label=f"operating point (t = {report['threshold']:.3f})",
        )
    left.set_xlabel("1 − specificity")
    left.set_ylabel("sensitivity")
    left.set_title("study ROC (test)")
    left.legend(loc="lower right")
    curve = report["froc"]
    right.step(curve["fp_per_study"], curve["sensitivity"], where="post")
    right.set_xlabel("false positives per study")
    right.set_ylabel("lesion studies detected on a lesion slice")
    right.set_ylim(0, 1.02)
    right.set_title("FROC-style (test)")
    fig.tight_layout()
    fig.savefig(out_dir / STUDY_FROC_PNG, dpi=100)
    plt.close(fig)
    written.append(out_dir / STUDY_FROC_PNG)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, rows, unit, title in (
        (left, report["by_diameter_mm"], " mm", "by lesion diameter"),
        (right, report["by_abs_contrast"], "", "by |contrast|"),
    ):
        labels = [_bin_label(r, unit) for r in rows]
        values = [r["sensitivity"] for r in rows]
        bars = axis.bar(range(len(rows)), values, color="tab:blue")
        for bar, row in zip(bars, rows, strict=True):
            axis.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height() + 0.02,
                f"{row['detected']}/{row['studies']}",
                ha="center",
                fontsize="small",
            )
        axis.axhline(RELIABLE_SENSITIVITY, color="grey", linestyle="--", linewidth=0.8)
        axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        axis.set_ylim(0, 1.12)
        axis.set_ylabel("sensitivity at the operating point")
        axis.set_title(f"test lesion studies {title}")
    fig.tight_layout()
    fig.savefig(out_dir / STUDY_BINS_PNG, dpi=100)
    plt.close(fig)
    written.append(out_dir / STUDY_BINS_PNG)
    return written
