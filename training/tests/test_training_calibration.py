"""Temperature scaling, Platt scaling and the expected calibration error (training.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from scanwatch.study_score import Calibration, logit
from training.calibration import (
    apply_temperature,
    fit_platt,
    fit_temperature,
    negative_log_likelihood,
    reliability,
    top_label_reliability,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int, sharpen: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); predictions softmax(sharpen · z): T = sharpen undoes it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 4))
    truth = softmax(z)
    labels = np.array([rng.choice(4, p=p) for p in truth])
    return softmax(sharpen * z), labels


def test_temperature_recovers_how_overconfident_the_model_is() -> None:
    probabilities, labels = overconfident(20000, sharpen=3.0)
    temperature = fit_temperature(probabilities, labels)
    assert temperature == pytest.approx(3.0, rel=0.08)
    scaled = apply_temperature(probabilities, temperature)
    assert negative_log_likelihood(scaled, labels) < negative_log_likelihood(probabilities, labels)
    # Temperature never changes the predicted class.
    np.testing.assert_array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))
    before = top_label_reliability(probabilities, labels).ece
    after = top_label_reliability(scaled, labels).ece
    assert after < 0.03 < before


def test_a_calibrated_model_keeps_a_temperature_near_one() -> None:
    probabilities, labels = overconfident(20000, sharpen=1.0, seed=1)
    assert fit_temperature(probabilities, labels) == pytest.approx(1.0, abs=0.06)
    np.testing.assert_allclose(apply_temperature(probabilities, 1.0), probabilities, atol=1e-12)


def test_temperature_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature must be a positive"):
        apply_temperature(np.full((2, 2), 0.5), 0.0)
    with pytest.raises(ValueError, match="need"):
        fit_temperature(np.full((3, 2), 0.5), np.zeros(2, dtype=int))


def test_ece_by_hand() -> None:
    # Both in the bin [0.8667, 0.9333): mean confidence 0.9, frequency 0.5 -> ECE 0.4.
    result = reliability([0.9, 0.9], [1, 0])
    assert result.ece == pytest.approx(0.4)
    assert sum(result.counts) == 2 and len(result.counts) == 15
    # Two bins, each perfectly calibrated -> 0; 1.0 falls in the last bin.
    assert reliability([0.0, 1.0, 1.0], [0, 1, 1]).ece == pytest.approx(0.0)
    assert reliability([1.0], [1]).counts[-1] == 1
    with pytest.raises(ValueError, match="one outcome per prediction"):
        reliability([0.5], [1, 0])


def test_platt_recovers_slope_and_intercept() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, 8000)
    raw = 1 / (1 + np.exp(-z))
    truth = 1 / (1 + np.exp(-(2.0 * z - 1.0)))
    outcome = rng.random(8000) < truth
    fitted = fit_platt(z, outcome)
    assert fitted.slope == pytest.approx(2.0, rel=0.1)
    assert fitted.intercept == pytest.approx(-1.0, abs=0.15)
    assert reliability(fitted.apply(raw), outcome).ece < reliability(raw, outcome).ece


def test_platt_is_finite_on_separable_data_and_identity_with_one_class() -> None:
    scores = logit([0.1, 0.2, 0.8, 0.9])
    fitted = fit_platt(scores, [0, 0, 1, 1])
    assert 0 < fitted.slope < 100 and np.isfinite(fitted.intercept)
    assert fit_platt(logit([0.3, 0.6]), [1, 1]) == Calibration()
    # Scores that point the wrong way would need a negative slope: refused (never reorder).
    assert fit_platt(np.tile(scores, 5), [1, 1, 0, 0] * 5) == Calibration()
