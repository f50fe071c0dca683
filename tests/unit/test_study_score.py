"""The study rule: aggregation, calibration and class shares, as the worker and the
evaluation both compute them (scanwatch.study_score)."""

from __future__ import annotations

import numpy as np
import pytest

from scanwatch.study_score import LEGACY_RULE, Calibration, StudyRule, logit, study_result

NORMAL = 0


def slices(*anomalies: float, abnormal_class: int = 1) -> np.ndarray:
    """Slice probabilities over (normal, mass, bleed) with the given anomaly scores."""
    p = np.zeros((len(anomalies), 3))
    p[:, NORMAL] = 1 - np.asarray(anomalies)
    p[:, abnormal_class] = anomalies
    return p


def test_the_legacy_rule_is_the_mean_of_the_slice_probabilities() -> None:
    p = np.random.default_rng(0).dirichlet(np.ones(3), size=7)
    result = study_result(p, NORMAL, LEGACY_RULE)
    np.testing.assert_allclose(result.probabilities, p.mean(axis=0))
    assert result.anomaly_score == pytest.approx(1 - p[:, NORMAL].mean())


def test_a_finding_on_two_of_thirty_slices_is_not_averaged_away() -> None:
    p = slices(*([0.01] * 28 + [0.97, 0.9]))
    assert study_result(p, NORMAL, LEGACY_RULE).anomaly_score < 0.1
    assert study_result(p, NORMAL, StudyRule("max")).anomaly_score == pytest.approx(0.97)
    top2 = study_result(p, NORMAL, StudyRule("top_k_mean", k=2))
    assert top2.anomaly_score == pytest.approx(0.935)
    assert top2.strongest == 28


def test_noisy_or_is_the_chance_that_some_slice_is_abnormal() -> None:
    p = slices(0.5, 0.5, 0.0)
    assert study_result(p, NORMAL, StudyRule("noisy_or")).anomaly_score == pytest.approx(0.75)
    many = slices(*([0.02] * 500))  # log space: no underflow over hundreds of slices
    expected = 1 - 0.98**500
    assert study_result(many, NORMAL, StudyRule("noisy_or")).raw_score == pytest.approx(expected)


@pytest.mark.parametrize(
    ("count", "weaker", "stronger"),
    [(24, 0.6, 0.7), (160, 0.3, 0.35)],  # past 1 - 1e-7; past float64's 1.0
)
def test_noisy_or_keeps_the_order_of_studies_whose_raw_score_rounds_to_1(
    count: int, weaker: float, stronger: float
) -> None:
    rule = StudyRule("noisy_or", calibration=Calibration(slope=0.2, intercept=-3.0))
    low, high = (study_result(slices(*[a] * count), NORMAL, rule) for a in (weaker, stronger))
    assert low.raw_score > 1 - 1e-7 and high.raw_score > 1 - 1e-7
    # logit(1 - (1 - a)^n) = log(e^s - 1), s = -n log(1 - a): ≈ s once e^-s is negligible
    assert low.raw_logit == pytest.approx(-count * np.log1p(-weaker))
    assert low.anomaly_score < high.anomaly_score < 1.0
    # where raw has not rounded, the same logit as read from raw
    moderate = study_result(slices(0.3, 0.2, 0.1), NORMAL, rule)
    assert moderate.raw_logit == pytest.approx(logit(moderate.raw_score))
    assert study_result(slices(0.0, 0.0), NORMAL, rule).raw_logit == pytest.approx(logit(0.0))


def test_top_k_larger_than_the_study_takes_every_slice() -> None:
    p = slices(0.2, 0.4)
    assert study_result(p, NORMAL, StudyRule("top_k_mean", k=5)).raw_score == pytest.approx(0.3)


def test_the_class_breakdown_comes_from_the_evidence_slices() -> None:
    p = np.vstack([slices(0.9, abnormal_class=2), slices(*([0.3] * 10), abnormal_class=1)])
    result = study_result(p, NORMAL, StudyRule("max"))
    assert result.probabilities.sum() == pytest.approx(1)
    assert result.probabilities[2] == pytest.approx(0.9)  # the strongest slice's class only
    assert result.probabilities[1] == pytest.approx(0)


def test_calibration_moves_the_score_and_keeps_the_order() -> None:
    rule = StudyRule("max", calibration=Calibration(slope=0.5, intercept=-1.0))
    low, high = (study_result(slices(a), NORMAL, rule).anomaly_score for a in (0.6, 0.9))
    assert low < high
    logit = np.log(0.9 / 0.1)
    assert high == pytest.approx(1 / (1 + np.exp(-(0.5 * logit - 1.0))))
    result = study_result(slices(0.9), NORMAL, rule)
    assert result.raw_score == pytest.approx(0.9)
    assert 1 - result.probabilities[NORMAL] == pytest.approx(result.anomaly_score)


def test_a_rule_round_trips_through_json() -> None:
    rule = StudyRule("top_k_mean", k=3, calibration=Calibration(0.8, 0.2), operating_point="x")
    assert StudyRule.from_json(rule.to_json()) == rule
    assert StudyRule.from_json(rule.to_json().encode()) == rule
    assert rule.name == "top_3_mean"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not json", "not JSON"),
        ("[1]", "JSON object"),
        ('{"aggregation": "median"}', "aggregation must be one of"),
        ('{"aggregation": "top_k_mean", "k": 0}', "k must be a positive integer"),
        ('{"calibration": {"slope": -1}}', "slope must be > 0"),
        ('{"calibration": {"slope": "NaN"}}', "finite number"),
        ('{"colour": 1}', "unknown fields: colour"),
    ],
)
def test_a_bad_rule_is_refused_with_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        StudyRule.from_json(text)


def test_bad_probabilities_are_refused() -> None:
    with pytest.raises(ValueError, match="slices >= 1"):
        study_result(np.zeros((0, 3)), NORMAL)
    with pytest.raises(ValueError, match="normal_index"):
        study_result(slices(0.1), 3)
