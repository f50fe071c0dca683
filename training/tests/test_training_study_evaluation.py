"""Study-level evaluation: aggregation by measurement, calibration, operating point, report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scanwatch.study_score import StudyRule, logit, study_result
from training.study_evaluation import (
    CANDIDATE_RULES,
    SELECTION_METRICS,
    STUDY_BINS_PNG,
    STUDY_FROC_PNG,
    STUDY_RELIABILITY_PNG,
    OperatingTarget,
    StudyEvaluation,
    StudyScores,
    choose_rule,
    choose_threshold,
    epoch_selection,
    evaluate_study_benchmark,
    flagged,
    flat_study_metrics,
    froc,
    promotion_metrics,
    rule_row,
    score_studies,
    sensitivity_at_specificity,
    sensitivity_by_bin,
    smallest_reliable_bin,
    study_markdown,
    write_study_plots,
)

CLASSES = ("normal", "mass")


# -- small fakes of training.study_dataset's types (same fields) ------------------------------


@dataclass(frozen=True)
class Info:
    study_id: str
    label: int
    diameter_mm: float
    contrast: float
    lesion_slices: tuple[int, ...]


@dataclass(frozen=True)
class Studies:
    images: np.ndarray
    labels: np.ndarray
    study_index: np.ndarray
    position: np.ndarray
    studies: tuple[Info, ...]


@dataclass(frozen=True)
class Benchmark:
    class_names: tuple[str, ...]
    train: Studies
    val: Studies
    test: Studies
    description: dict


@dataclass(frozen=True)
class Settings:
    target_sensitivity: float = 0.95
    target_min_diameter_mm: float = 5.0
    aggregation_min_specificity: float = 0.9
    batch_size: int = 32


def make_studies(n: int, seed: int, slices: int = 20, shuffle: bool = False) -> Studies:
    """Studies whose slice 'image' is one number: the evidence a perfect-ish model would see.
    A lesion is on 2 adjacent slices, its evidence growing with its diameter (2-40 mm); the
    normal slices of a study share a subject offset, which a study mean adds up."""
    rng = np.random.default_rng(seed)
    evidence, labels, index, position, infos = [], [], [], [], []
    for s in range(n):
        lesion = s % 2 == 1
        diameter = float(np.exp(rng.uniform(np.log(2), np.log(40)))) if lesion else 0.0
        first = int(rng.integers(0, slices - 1))
        on = (first, first + 1) if lesion else ()
        subject = rng.normal(0.0, 1.0)  # some subjects' normal slices look less normal
        for p in range(slices):
            e = rng.normal(-3.0 + subject, 0.5)
            if p in on:
                e = rng.normal(-3.0 + 1.6 * np.log(diameter), 0.7)
            evidence.append(e)
            labels.append(1 if p in on else 0)
            index.append(s)
            position.append(p)
        infos.append(
            Info(f"study-{seed}-{s:03d}", int(lesion), diameter, 0.3 if lesion else 0.0, on)
        )
    order = rng.permutation(len(labels)) if shuffle else np.arange(len(labels))
    images = np.asarray(evidence, dtype=np.float32)[order].reshape(-1, 1, 1, 1)
    return Studies(
        images,
        np.asarray(labels, dtype=np.int64)[order],
        np.asarray(index, dtype=np.int64)[order],
        np.asarray(position, dtype=np.int64)[order],
        tuple(infos),
    )


def overconfident_predict(images: np.ndarray) -> np.ndarray:
    """A two-class model, too sure of itself (its logits are scaled up 3x)."""
    z = 3.0 * images.reshape(-1).astype(np.float64)
    abnormal = 1 / (1 + np.exp(-z))
    return np.stack([1 - abnormal, abnormal], axis=1)


@pytest.fixture(scope="module")
def benchmark() -> Benchmark:
    return Benchmark(
        CLASSES, make_studies(10, 0), make_studies(240, 1), make_studies(240, 2, shuffle=True), {}
    )


@pytest.fixture(scope="module")
def evaluation(benchmark: Benchmark) -> StudyEvaluation:
    return evaluate_study_benchmark(overconfident_predict, benchmark, Settings())


def scores(
    score: list[float],
    abnormal: list[bool],
    diameter: list[float] | None = None,
    hit: list[bool] | None = None,
) -> StudyScores:
    n = len(score)
    return StudyScores(
        raw=np.array(score),
        logit=logit(score),
        score=np.array(score),
        strongest=np.zeros(n, dtype=np.int64),
        abnormal=np.array(abnormal),
        hit=np.array(hit if hit is not None else abnormal),
        diameter_mm=np.array(diameter if diameter is not None else [10.0] * n),
        contrast=np.zeros(n),
    )


# -- the pieces --------------------------------------------------------------------------------


def test_studies_are_scored_with_the_workers_function_in_slice_order() -> None:
    split = make_studies(6, 3, slices=8, shuffle=True)
    probabilities = overconfident_predict(split.images)
    rule = StudyRule("top_k_mean", k=2)
    result = score_studies(probabilities, split, 0, rule)
    for study in range(6):
        rows = np.flatnonzero(split.study_index == study)
        rows = rows[np.argsort(split.position[rows])]
        expected = study_result(probabilities[rows], 0, rule)
        assert result.score[study] == pytest.approx(expected.anomaly_score)
        assert result.strongest[study] == split.position[rows[expected.strongest]]
        info = split.studies[study]
        assert result.abnormal[study] == (info.label != 0)
        assert result.hit[study] == (result.strongest[study] in info.lesion_slices)


def test_sensitivity_at_specificity_reads_the_roc() -> None:
    # 10 normals; one false positive allowed (spec 0.9) lets the threshold drop to 0.5.
    normal = [0.1] * 8 + [0.7, 0.4]
    lesion = [0.9, 0.55, 0.5, 0.2]
    s, y = normal + lesion, [False] * 10 + [True] * 4
    assert sensitivity_at_specificity(s, y, 0.9) == pytest.approx(0.75)
    assert sensitivity_at_specificity(s, y, 0.95) == pytest.approx(0.25)
    assert sensitivity_at_specificity(s, y, 0.8) == pytest.approx(1.0)
    assert sensitivity_at_specificity(s, [True] * 14, 0.9) is None


def test_rule_choice_follows_the_stated_criterion() -> None:
    def row(sens: float, auc: float) -> dict[str, float]:
        return {"val_sensitivity_at_specificity": sens, "val_auroc": auc}

    assert choose_rule([row(0.5, 0.9), row(0.8, 0.7), row(0.7, 0.99)]) == 1  # sensitivity first
    assert choose_rule([row(0.8, 0.9), row(0.8, 0.95), row(0.8, 0.95)]) == 1  # AUROC, simpler
    assert [r.name for r in CANDIDATE_RULES] == [
        "mean",
        "max",
        "top_2_mean",
        "top_3_mean",
        "top_5_mean",
        "noisy_or",
    ]


def test_threshold_is_the_highest_meeting_the_target_for_large_enough_lesions() -> None:
    # Targeted lesions (>= 5 mm) score 0.9, 0.8, 0.7, 0.6; a 3 mm lesion 0.95 does not count.
    s = scores(
        [0.9, 0.8, 0.7, 0.6, 0.95, 0.65, 0.3],
        [True, True, True, True, True, False, False],
        [10, 10, 10, 10, 3, 0, 0],
    )
    t = choose_threshold(s, OperatingTarget(0.75, 5.0))
    assert t == pytest.approx((0.7 + 0.65) / 2)  # 3 of 4 needed; midway to the next score
    assert flagged(s.score[:4], t).mean() >= 0.75
    t_all = choose_threshold(s, OperatingTarget(1.0, 5.0))
    assert t_all == pytest.approx((0.6 + 0.3) / 2)  # midway between 0.6 and 0.3
    assert flagged(s.score[:4], t_all).all()
    with pytest.raises(ValueError, match="no validation study has a lesion of at least 50 mm"):
        choose_threshold(s, OperatingTarget(0.9, 50.0))


def test_bins_and_the_smallest_reliable_one() -> None:
    s = scores(
        [0.9, 0.1, 0.9, 0.9, 0.9, 0.2],
        [True, True, True, True, True, False],
        [3.0, 4.5, 4.8, 7.0, 25.0, 0.0],
    )
    rows = sensitivity_by_bin(s.diameter_mm, s, 0.5, (0, 4, 5, 10, float("inf")))
    assert [(r["low"], r["studies"], r["detected"]) for r in rows] == [
        (0, 1, 1),
        (4, 2, 1),
        (5, 1, 1),
        (10, 1, 1),
    ]
    assert rows[-1]["high"] is None
    # 0-4 mm is fine but 4-5 mm is not: sensitivity stays >= 0.9 only from 5 mm.
    assert smallest_reliable_bin(rows) == 5
    assert smallest_reliable_bin(rows[2:]) == 5
    assert (
        smallest_reliable_bin([{"low": 0, "sensitivity": 1.0}, {"low": 9, "sensitivity": 0}])
        is None
    )


def test_froc_counts_a_detection_on_the_wrong_slice_as_a_false_positive() -> None:
    s = scores(
        [0.9, 0.8, 0.7, 0.1],
        [True, True, False, False],
        hit=[True, False, False, False],
    )
    curve = froc(s)
    points = list(zip(curve["fp_per_study"], curve["sensitivity"], strict=True))
    assert points[:3] == [(0.0, 0.0), (0.0, 0.5), (0.25, 0.5)]
    assert max(curve["sensitivity"]) == 0.5  # the mislocalised lesion is never detected
    assert curve["fp_per_study"][-1] == 0.75
    assert curve["sensitivity_at_fp_per_study"]["0.1"] == 0.5
    assert curve["localised"] == 0.5


# -- the whole evaluation ----------------------------------------------------------------------


def test_evaluation_chooses_a_focal_rule_calibrates_and_meets_its_target(
    evaluation: StudyEvaluation, benchmark: Benchmark
) -> None:
    rule, threshold, temperature, report = evaluation
    # The fake model is too sure of itself: temperature scaling softens it (T > 1) and the
    # validation NLL drops; the report records both.
    assert temperature > 1.2
    fitted = report["temperature"]
    assert fitted["value"] == temperature and fitted["val_nll_after"] < fitted["val_nll_before"]
    assert fitted["test_nll_after"] < fitted["test_nll_before"]
    # A lesion on 2 of 20 slices: the mean drowns it, the chosen rule keeps it.
    table = {row["rule"]: row for row in report["aggregation_table"]}
    assert set(table) == {r.name for r in CANDIDATE_RULES}
    assert rule.name != "mean"
    chosen = table[rule.name]
    assert chosen["chosen"] and sum(r["chosen"] for r in table.values()) == 1
    assert (
        chosen["val_sensitivity_at_specificity"] > table["mean"]["val_sensitivity_at_specificity"]
    )
    assert rule.calibration.slope > 0 and rule.operating_point.startswith(
        "study sensitivity >= 0.95 for lesions >= 5 mm"
    )
    assert StudyRule.from_json(rule.to_json()) == rule
    assert report["rule"]["json"] == rule.to_json()
    # The threshold meets the target on validation, with the worker's decision (score > t).
    assert 0 < threshold < 1
    val = report["validation"]
    assert val["target_sensitivity"] >= 0.95 and val["target_studies"] > 50
    # Recompute on validation from scratch, as the worker would, with the exported probabilities.
    p = overconfident_predict(benchmark.val.images)
    z = np.log(p) / temperature
    served = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    val_scores = score_studies(served, benchmark.val, 0, rule)
    targeted = val_scores.abnormal & (val_scores.diameter_mm >= 5)
    assert flagged(val_scores.score[targeted], threshold).mean() >= 0.95
    # Study calibration lowers the test ECE of the raw aggregated score.
    calibration = report["calibration"]
    assert (
        calibration["test_reliability_after"]["ece"] < calibration["test_reliability_before"]["ece"]
    )
    test = report["test"]
    assert test["studies"] == 240 and 0.5 < test["auroc"] <= 1
    assert test["specificity"] is not None and test["sensitivity"] is not None
    # Small lesions are harder: the smallest bin is below the largest.
    bins = report["by_diameter_mm"]
    assert bins[0]["sensitivity"] < bins[-1]["sensitivity"]
    assert report["smallest_reliable_diameter_mm"] is not None
    assert sum(r["studies"] for r in bins) == test["abnormal_studies"]
    json.dumps(report)  # JSON-ready


def test_promotion_metrics_use_the_versions_own_rule(benchmark: Benchmark) -> None:
    p = overconfident_predict(benchmark.test.images)
    legacy = promotion_metrics(p, benchmark.test, 0)
    focal = promotion_metrics(p, benchmark.test, 0, StudyRule("max"))
    assert focal > legacy  # the study mean loses focal findings
    with pytest.raises(ValueError, match="both normal and lesion"):
        only_lesions = make_studies(1, 5)
        only_lesions = Studies(
            only_lesions.images,
            only_lesions.labels,
            only_lesions.study_index,
            only_lesions.position,
            (Info("x", 1, 10.0, 0.3, (0, 1)),),
        )
        promotion_metrics(overconfident_predict(only_lesions.images), only_lesions, 0)


def test_report_markdown_plots_and_registry_metrics(
    evaluation: StudyEvaluation, tmp_path: Path
) -> None:
    report = evaluation.report
    text = study_markdown(report)
    assert "## Study level" in text and evaluation.rule.name in text
    assert f"{report['threshold']:.4f}" in text
    assert "smallest bin from which it stays ≥ 0.9" in text
    written = write_study_plots(report, tmp_path)
    assert [p.name for p in written] == [STUDY_RELIABILITY_PNG, STUDY_FROC_PNG, STUDY_BINS_PNG]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    flat = flat_study_metrics(report)
    assert (
        flat["study_sensitivity_at_spec90"]
        == report["test"]["promotion"]["study_sensitivity_at_spec90"]
    )
    assert flat["study_threshold"] == report["threshold"]


def test_a_benchmark_without_lesions_that_large_targets_every_lesion(
    benchmark: Benchmark,
) -> None:
    rule, threshold, _t, report = evaluate_study_benchmark(
        overconfident_predict, benchmark, Settings(target_min_diameter_mm=100.0)
    )
    assert "no validation lesion is >= 100 mm" in report["target"]["fallback"]
    assert rule.operating_point.startswith("study sensitivity >= 0.95 for lesions >= 0 mm")
    assert report["validation"]["target_studies"] == report["validation"]["abnormal_studies"]
    assert report["validation"]["target_sensitivity"] >= 0.95
    assert "the target covers every lesion" in study_markdown(report)


def test_validation_studies_of_one_kind_are_refused(benchmark: Benchmark) -> None:
    val = benchmark.val
    lesions_only = Studies(
        val.images,
        val.labels,
        val.study_index,
        val.position,
        tuple(Info(s.study_id, 1, 10.0, 0.3, (0, 1)) for s in val.studies),
    )
    broken = Benchmark(CLASSES, val, lesions_only, benchmark.test, {})
    with pytest.raises(ValueError, match="both normal and lesion studies"):
        evaluate_study_benchmark(overconfident_predict, broken, Settings())


def test_epochs_are_ranked_by_the_validation_lesion_slices_and_the_study_figures_recorded(
    benchmark: Benchmark,
) -> None:
    select = epoch_selection(benchmark, Settings())
    val = benchmark.val
    seeing = select(overconfident_predict)
    assert list(seeing) == list(SELECTION_METRICS)

    # First: lesion slices against every slice of the normal studies (not the normal slices
    # of lesion studies), on the anomaly score.
    anomaly = overconfident_predict(val.images)[:, 1]
    normal_study = np.array([val.studies[i].label == 0 for i in val.study_index])
    lesion = val.labels == 1
    scores = np.concatenate([anomaly[lesion], anomaly[normal_study]])
    truth = np.concatenate([np.ones(lesion.sum()), np.zeros(normal_study.sum())])
    assert seeing["val_lesion_slice_auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert seeing["val_lesion_slice_auroc"] > 0.9
    # Then the study figures of the rule the evaluation would choose (a focal one here).
    p = overconfident_predict(val.images)
    rows = [rule_row(r, score_studies(p, val, 0, r), 0.9, "val") for r in CANDIDATE_RULES]
    best = rows[choose_rule(rows)]
    assert best["rule"] != "mean"
    assert seeing["val_study_sensitivity_at_specificity"] == best["val_sensitivity_at_specificity"]
    assert seeing["val_study_auroc"] == best["val_auroc"]

    def blind(images: np.ndarray) -> np.ndarray:  # the lesion slices' evidence removed
        return overconfident_predict(np.full_like(images, -3.0))

    assert select(blind)["val_lesion_slice_auroc"] == pytest.approx(0.5)
    assert select(blind)["val_study_auroc"] == pytest.approx(0.5)
