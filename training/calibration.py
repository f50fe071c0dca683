"""Calibration fitted on validation predictions: slice temperature, study Platt scaling, ECE.

* **Temperature scaling** (Guo et al., 2017) of the slice classifier: one scalar ``T`` that
  minimises the negative log-likelihood of ``softmax(log p / T)`` on validation slices. It keeps
  every slice's predicted class (argmax) and changes only how sure the probabilities are; the
  export bakes it into both serving signatures (:class:`training.export.ServingModule`).
* **Platt scaling** (Platt, 1999) of a raw study score on the logit scale, fitted on validation
  studies, with Platt's smoothed targets so that a validation set the score separates perfectly
  still gives a finite slope. The result is :class:`scanwatch.study_score.Calibration`, which
  the worker applies (this module only fits it).
* **Reliability** in equal-width bins and the expected calibration error (ECE: the
  count-weighted mean gap between the mean predicted probability and the observed frequency).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize, minimize_scalar

from scanwatch.study_score import Calibration

#: Equal-width bins of the reliability diagrams and the ECE (Guo et al. use 15).
ECE_BINS = 15
#: Probabilities are clipped here before their log (the graph uses the same floor when it has
#: no pre-softmax scores to scale): float32's smallest normal number, so that every probability
#: a float32 model returns keeps its own log; only exact zeros are raised to it.
PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)
#: The fitted temperature stays in this range (outside it the validation set is degenerate).
TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(probabilities: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float64]:
    """``softmax(log(p) / T)`` per row: what the exported graph returns for temperature ``T``."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    logits = np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR))
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)


def negative_log_likelihood(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean NLL of the true classes."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], PROBABILITY_FLOOR))))


def fit_temperature(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The temperature minimising the NLL of ``softmax(log p / T)`` on these predictions.

    Searched on log T (the NLL is smooth and unimodal there) within :data:`TEMPERATURE_RANGE`.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise ValueError(f"need (n, classes) probabilities and n labels, got {p.shape}, {y.shape}")
    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(apply_temperature(p, float(np.exp(log_t))), y),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def fit_platt(raw_logits: npt.ArrayLike, outcomes: npt.ArrayLike) -> Calibration:
    """Platt scaling ``sigmoid(a · logit(raw) + b)`` fitted by maximum likelihood, given the raw
    study scores on the logit scale (:meth:`scanwatch.study_score.StudyRule.aggregate_logit`,
    which keeps apart the noisy-OR scores that round to 1).

    Targets are Platt's smoothed ones, ``(N₊ + 1) / (N₊ + 2)`` and ``1 / (N₋ + 2)``, so the fit is
    finite on separable data. With one class only, or a fit that would reverse the order
    (slope ≤ 0), the identity is returned: a calibration must never reorder studies.
    """
    x = np.asarray(raw_logits, dtype=np.float64)
    y = np.asarray(outcomes, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need one outcome per score, got {x.shape} and {y.shape}")
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return Calibration()
    target = np.where(y, (positives + 1) / (positives + 2), 1 / (negatives + 2))

    def loss(params: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
        a, b = params
        z = a * x + b
        # log(1 + e^z) - t·z is the cross-entropy of sigmoid(z) against t
        value = float(np.sum(np.logaddexp(0.0, z) - target * z))
        residual = 1.0 / (1.0 + np.exp(-z)) - target
        return value, np.array([np.sum(residual * x), np.sum(residual)])

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, method="BFGS")
    slope, intercept = (float(v) for v in result.x)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope <= 0:
        return Calibration()
    return Calibration(slope=slope, intercept=intercept)


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's numbers: per equal-width bin of predicted probability."""

    edges: tuple[float, ...]  # bins + 1
    confidence: tuple[float | None, ...]  # mean predicted probability (None: empty bin)
    frequency: tuple[float | None, ...]  # observed frequency of the event
    counts: tuple[int, ...]
    ece: float

    def as_dict(self) -> dict[str, object]:
        return {
            "ece": self.ece,
            "bins": [
                {"low": lo, "high": hi, "count": n, "confidence": c, "frequency": f}
                for lo, hi, n, c, f in zip(
                    self.edges[:-1],
                    self.edges[1:],
                    self.counts,
                    self.confidence,
                    self.frequency,
                    strict=True,
                )
            ],
        }


def reliability(
    predicted: npt.ArrayLike, happened: npt.ArrayLike, bins: int = ECE_BINS
) -> Reliability:
    """Reliability of probabilities ``predicted`` for events ``happened`` (0/1), and the ECE.

    Bins are ``[i/bins, (i+1)/bins)``, the last one closed.
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(happened, dtype=np.float64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need one outcome per prediction, got {p.shape} and {y.shape}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    confidence: list[float | None] = []
    frequency: list[float | None] = []
    counts: list[int] = []
    ece = 0.0
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        counts.append(n)
        if n == 0:
            confidence.append(None)
            frequency.append(None)
            continue
        c, f = float(p[members].mean()), float(y[members].mean())
        confidence.append(c)
        frequency.append(f)
        ece += n / p.size * abs(c - f)
    return Reliability(
        tuple(float(e) for e in edges), tuple(confidence), tuple(frequency), tuple(counts), ece
    )


def top_label_reliability(
    probabilities: npt.ArrayLike, labels: npt.ArrayLike, bins: int = ECE_BINS
) -> Reliability:
    """Slice-level reliability as Guo et al. define it: the top class's probability against
    whether the top class is right."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return reliability(p.max(axis=1), p.argmax(axis=1) == y, bins)
