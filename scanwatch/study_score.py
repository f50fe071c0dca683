"""From slice outputs to one study result: the rule a model ships with, written once.

The training evaluation measures a study with exactly what the worker computes, so both call
:func:`study_result`. A model carries its rule in the ``study_rule`` output of its
``serving_default`` signature (:data:`schemas.model_signature.STUDY_RULE`), a JSON object;
a model without one is read as :data:`LEGACY_RULE`, the study mean scanwatch used before.

The rule, for a study of n slices with class probabilities ``p[i]`` and slice anomaly
``a[i] = 1 - p[i][normal]``:

1. **aggregation** of the ``a[i]`` into a raw study score:
   ``mean``; ``max``; ``top_k_mean`` (mean of the k largest); ``noisy_or``
   (``1 - prod(1 - a[i])``: the study is normal only if every slice is).
2. **calibration** of the raw score: ``sigmoid(slope * logit(raw) + intercept)`` (Platt scaling
   on the logit, fitted on validation studies; slope 1, intercept 0 leaves it unchanged). This
   calibrated score is the study's anomaly score, compared with the model's ``threshold``.
   ``logit(raw)`` is computed from the aggregation itself (:meth:`StudyRule.aggregate_logit`):
   noisy-OR's raw score rounds to 1 once a study's slices add up enough evidence (24 slices of
   0.5 pass ``1 - 1e-7``; 160 slices of 0.2 reach a float's 1.0), and read from the rounded
   score those studies would tie.
3. **class probabilities**: ``normal`` gets ``1 - score``; the abnormal classes share ``score``
   in proportion to their mean probability over the *evidence slices* (the k slices with the
   largest ``a[i]``; one for ``max`` and ``noisy_or``, all for ``mean``).

With ``mean`` and no calibration this is the mean of the slice probabilities, as before.
``strongest`` is the slice with the largest ``a[i]`` (the first on a tie): where the evidence lies.

The rule also says what the model must be sent (``context``, issue 18's 2.5D input): ``none``
(each slice repeated into the three channels; the field is then left out of the JSON, so a
model trained without context exports the very rule it did before) or ``neighbours`` (the
slice below, the slice, the slice above in the series' order:
:func:`scanwatch.imaging.neighbour_channels`). A worker that reads ``neighbours`` from a
model's answer builds each scored slice's channels from its neighbours.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from scanwatch.imaging import INPUT_CONTEXTS, NO_CONTEXT

AGGREGATIONS = ("mean", "max", "top_k_mean", "noisy_or")
#: Keeps logit() finite for scores of exactly 0 or 1.
_EPSILON = 1e-7


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the raw study score on the logit scale."""

    slope: float = 1.0
    intercept: float = 0.0

    def __post_init__(self) -> None:
        for name in ("slope", "intercept"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"calibration {name} must be a finite number, got {value!r}")
        if self.slope <= 0:
            raise ValueError(
                f"calibration slope must be > 0 (it keeps the order), got {self.slope}"
            )

    def apply(self, raw: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Calibrated scores of raw study scores (any shape)."""
        return self.apply_logit(logit(raw))

    def apply_logit(self, raw_logit: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Calibrated scores of raw study scores given on the logit scale (any shape)."""
        z = self.slope * np.asarray(raw_logit, dtype=np.float64) + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


def logit(scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``log(s / (1 - s))`` of scores clipped to ``[1e-7, 1 - 1e-7]`` (finite at 0 and 1)."""
    clipped = np.clip(np.asarray(scores, dtype=np.float64), _EPSILON, 1 - _EPSILON)
    return np.asarray(np.log(clipped) - np.log1p(-clipped), dtype=np.float64)


@dataclass(frozen=True)
class StudyRule:
    """How a model's slice outputs become a study result (see the module's docstring)."""

    aggregation: str = "mean"
    k: int = 1
    calibration: Calibration = field(default_factory=Calibration)
    #: What the threshold was chosen for, in words (shown in reports and the console).
    operating_point: str = ""
    #: How each slice's three input channels are built (:data:`scanwatch.imaging.INPUT_CONTEXTS`).
    context: str = NO_CONTEXT

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"
            )
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.context not in INPUT_CONTEXTS:
            raise ValueError(
                f"context must be one of {', '.join(INPUT_CONTEXTS)}, got {self.context!r}"
            )

    @property
    def name(self) -> str:
        """A short label: ``max``, ``top_3_mean``, ``noisy_or``, ``mean``."""
        return f"top_{self.k}_mean" if self.aggregation == "top_k_mean" else self.aggregation

    def evidence_count(self, n: int) -> int:
        """How many of n slices carry the study's class breakdown."""
        if self.aggregation == "mean":
            return n
        if self.aggregation == "top_k_mean":
            return min(self.k, n)
        return 1

    def aggregate(self, anomaly: npt.ArrayLike) -> float:
        """The raw (uncalibrated) study score of slice anomaly scores."""
        a = _slice_scores(anomaly)
        if self.aggregation == "mean":
            return float(a.mean())
        if self.aggregation == "max":
            return float(a.max())
        if self.aggregation == "top_k_mean":
            k = min(self.k, a.size)
            return float(np.partition(a, a.size - k)[a.size - k :].mean())
        return float(-np.expm1(-_noisy_or_evidence(a)))

    def aggregate_logit(self, anomaly: npt.ArrayLike) -> float:
        """``logit`` of the raw study score, what calibration reads. Noisy-OR's comes from its
        evidence ``s`` (``raw = 1 - exp(-s)``, so ``logit(raw) = log(exp(s) - 1)``), which keeps
        growing where ``raw`` has rounded to 1; the others' is :func:`logit` of ``raw``."""
        if self.aggregation != "noisy_or":
            return float(logit(self.aggregate(anomaly)))
        s = _noisy_or_evidence(_slice_scores(anomaly))
        floor = float(logit(0.0))
        # log(e^s - 1) = s + log(1 - e^-s): no overflow for large s
        return floor if s <= 0 else max(floor, s + math.log(-math.expm1(-s)))

    def to_json(self) -> str:
        fields = asdict(self)
        if self.context == NO_CONTEXT:  # as exported before the field existed, byte for byte
            del fields["context"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StudyRule:
        """Parse a model's ``study_rule`` output; ValueError names what is wrong."""
        try:
            data: Any = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"study_rule is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("study_rule must be a JSON object")
        unknown = set(data) - {"aggregation", "k", "calibration", "operating_point", "context"}
        if unknown:
            raise ValueError(f"study_rule has unknown fields: {', '.join(sorted(unknown))}")
        calibration = data.get("calibration") or {}
        if not isinstance(calibration, dict) or set(calibration) - {"slope", "intercept"}:
            raise ValueError("study_rule calibration must be {slope, intercept}")
        try:
            return cls(
                aggregation=data.get("aggregation", "mean"),
                k=data.get("k", 1),
                calibration=Calibration(**calibration),
                operating_point=str(data.get("operating_point", "")),
                context=data.get("context", NO_CONTEXT),
            )
        except TypeError as exc:
            raise ValueError(f"study_rule: {exc}") from exc


def _slice_scores(anomaly: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """A study's slice anomaly scores as a flat array in [0, 1]; at least one is required."""
    a = np.clip(np.asarray(anomaly, dtype=np.float64).ravel(), 0.0, 1.0)
    if a.size == 0:
        raise ValueError("a study needs at least one slice")
    return a


def _noisy_or_evidence(anomaly: npt.NDArray[np.float64]) -> float:
    """``-sum(log(1 - a[i]))``, each slice capped below 1: noisy-OR's ``raw = 1 - exp(-s)``,
    in log space so that hundreds of slices neither underflow nor lose their order."""
    return float(-np.log1p(-np.minimum(anomaly, 1 - _EPSILON)).sum())


#: What a model without a ``study_rule`` output means: the study mean, uncalibrated.
LEGACY_RULE = StudyRule()


@dataclass(frozen=True)
class StudyResult:
    """One study's result under a rule."""

    probabilities: npt.NDArray[np.float64]  # (classes,), sums to 1
    anomaly_score: float  # calibrated; 1 - probabilities[normal]
    raw_score: float  # before calibration
    raw_logit: float  # logit(raw_score), from the aggregation: what calibration reads
    strongest: int  # index of the slice with the largest anomaly score
    slice_anomaly: npt.NDArray[np.float64]  # (n,)


def study_result(
    probabilities: npt.ArrayLike, normal_index: int, rule: StudyRule = LEGACY_RULE
) -> StudyResult:
    """The study result of slice probabilities (n × classes) under ``rule``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be (slices, classes) with slices >= 1, got {p.shape}")
    if not 0 <= normal_index < p.shape[1]:
        raise ValueError(f"normal_index {normal_index} is not a class of {p.shape[1]}")
    p = p / np.maximum(p.sum(axis=1, keepdims=True), _EPSILON)
    anomaly = 1.0 - p[:, normal_index]
    raw = rule.aggregate(anomaly)
    raw_logit = rule.aggregate_logit(anomaly)
    score = float(rule.calibration.apply_logit(raw_logit))
    # Stable order: the strongest first, ties in slice order.
    order = np.argsort(-anomaly, kind="stable")
    evidence = p[order[: rule.evidence_count(len(p))]].mean(axis=0)
    abnormal = np.delete(evidence, normal_index)
    total = abnormal.sum()
    shares = abnormal / total if total > _EPSILON else np.full(abnormal.size, 1 / abnormal.size)
    study = np.insert(score * shares, normal_index, 1.0 - score)
    return StudyResult(
        probabilities=study,
        anomaly_score=score,
        raw_score=raw,
        raw_logit=raw_logit,
        strongest=int(order[0]),
        slice_anomaly=anomaly,
    )
