"""Promotion on the study-level test split: the registry's rule and the served version's
re-evaluation with its own study rule (the study mean for a model that ships none)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest

from scanwatch.model_registry import (
    REJECTED,
    SERVING,
    STUDY_AUROC,
    STUDY_SENSITIVITY_AT_SPECIFICITY,
    PromotionRefused,
    Registry,
)
from scanwatch.study_score import LEGACY_RULE, StudyRule
from training.events import MemoryEvents
from training.export import export_saved_model
from training.lifecycle import predict_saved_model_with_rule, promote, serving_study_baseline
from training.study_evaluation import promotion_metrics

NAME = "brain"
CLASSES = ("normal", "mass")
FINGERPRINT = "b" * 64
SIZE = 16


def study_metrics(sensitivity: float, auroc: float, macro_f1: float) -> dict[str, float]:
    return {
        "macro_f1": macro_f1,
        STUDY_SENSITIVITY_AT_SPECIFICITY: sensitivity,
        STUDY_AUROC: auroc,
    }


def evidence_model() -> keras.Model:
    """p(mass) = sigmoid(3 · mean pixel value): a slice's 'image' is its evidence."""
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.array([[0.0, 1.0]] * 3, dtype=np.float32), np.zeros(2, np.float32)])
    return model


def register(
    registry: Registry,
    metrics: dict[str, float],
    rule: StudyRule | None = None,
    fingerprint: str = FINGERPRINT,
) -> int:
    version = registry.reserve(NAME)
    export_saved_model(
        evidence_model(),
        CLASSES,
        0.5,
        registry.repository / ".staging",
        NAME,
        version=version,
        study_rule=rule,
    )
    registry.record_candidate(
        NAME,
        version,
        dataset_fingerprint=fingerprint,
        metrics=metrics,
        class_names=list(CLASSES),
        threshold=0.5,
    )
    return version


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


def focal_studies(n: int = 60, slices: int = 12, seed: int = 4) -> Studies:
    """Lesions on 2 slices; normal slices share a subject offset (the study mean suffers)."""
    rng = np.random.default_rng(seed)
    values, labels, index, position, infos = [], [], [], [], []
    for s in range(n):
        lesion = s % 2 == 1
        first = int(rng.integers(0, slices - 1))
        on = (first, first + 1) if lesion else ()
        subject = rng.normal(0.0, 1.0)
        for p in range(slices):
            e = rng.normal(0.0, 0.7) if p in on else rng.normal(-3.0 + subject, 0.4)
            values.append(e / 3.0)  # the model multiplies by 3 (three channels)
            labels.append(int(p in on))
            index.append(s)
            position.append(p)
        infos.append(Info(f"s{s}", int(lesion), 10.0 if lesion else 0.0, 0.3, on))
    images = np.repeat(np.asarray(values, np.float32), SIZE * SIZE).reshape(-1, SIZE, SIZE, 1)
    return Studies(
        images,
        np.asarray(labels, np.int64),
        np.asarray(index, np.int64),
        np.asarray(position, np.int64),
        tuple(infos),
    )


def test_registry_compares_study_metrics_when_both_have_them(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    events = MemoryEvents()
    served = register(registry, study_metrics(0.90, 0.95, macro_f1=0.80))
    promote(registry, NAME, served, events)

    # Better slice macro-F1 is not enough: the study-level metric decides.
    worse = register(registry, study_metrics(0.85, 0.99, macro_f1=0.99))
    with pytest.raises(PromotionRefused, match="study test split sensitivity"):
        promote(registry, NAME, worse, events)
    assert registry.get(NAME, worse).status == REJECTED
    assert "study sensitivity at specificity 0.90" in (registry.get(NAME, worse).note or "")

    # Equal sensitivity: AUROC breaks the tie, either way.
    lower_auc = register(registry, study_metrics(0.90, 0.94, macro_f1=0.99))
    with pytest.raises(PromotionRefused):
        promote(registry, NAME, lower_auc, events)
    better = register(registry, study_metrics(0.90, 0.96, macro_f1=0.50))
    assert promote(registry, NAME, better, events) == served
    assert registry.get(NAME, better).status == SERVING


def test_macro_f1_decides_when_either_side_has_no_study_metrics(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    events = MemoryEvents()
    promote(registry, NAME, register(registry, {"macro_f1": 0.9}), events)
    # The candidate was measured on studies, the served version never was: macro-F1.
    with pytest.raises(PromotionRefused, match="macro-F1"):
        promote(registry, NAME, register(registry, study_metrics(1.0, 1.0, 0.8)), events)
    # Given the served version's study metrics on the candidate's split, those decide.
    candidate = register(registry, study_metrics(0.9, 0.95, 0.8))
    registry.promote(NAME, candidate, serving_study=(0.7, 0.9))
    assert registry.served_versions(NAME)[-1] == candidate


def test_the_served_version_is_scored_with_its_own_study_rule(tmp_path: Path) -> None:
    studies = focal_studies()
    registry = Registry(tmp_path)
    events = MemoryEvents()
    # The shipped model has no study_rule: the study mean.
    legacy = register(registry, {"macro_f1": 0.9}, fingerprint="c" * 64)
    promote(registry, NAME, legacy, events)
    probabilities, rule = predict_saved_model_with_rule(
        registry.model_dir(NAME) / str(legacy), studies.images
    )
    assert rule == LEGACY_RULE
    mean_metrics = promotion_metrics(probabilities, studies, 0, LEGACY_RULE)
    max_metrics = promotion_metrics(probabilities, studies, 0, StudyRule("max"))
    assert max_metrics > mean_metrics  # so which rule is used shows in the numbers
    baseline = serving_study_baseline(registry, NAME, CLASSES, studies, FINGERPRINT)
    assert baseline == pytest.approx(mean_metrics)

    # A candidate as good as max-aggregation beats the mean-aggregated served model...
    focal = register(registry, study_metrics(*max_metrics, macro_f1=0.5), rule=StudyRule("max"))
    assert promote(registry, NAME, focal, events, study_test=studies) == legacy
    # ... and, served, it is re-evaluated with its own rule (max), not the mean.
    assert serving_study_baseline(registry, NAME, CLASSES, studies, "d" * 64) == pytest.approx(
        max_metrics
    )
    # A candidate only as good as the mean is now refused.
    weak = register(registry, study_metrics(*mean_metrics, macro_f1=1.0))
    with pytest.raises(PromotionRefused):
        promote(registry, NAME, weak, events, study_test=studies)


def test_promotion_rebuilds_a_candidates_width_filtered_training_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A candidate trained with --min-lesion-mm is compared on its study test split: promotion
    finds that split by rebuilding the training data with the filter its run recorded."""
    from training import lifecycle
    from training import study_dataset as sd

    bench = sd.build_studies(sd.TINY)
    path = tmp_path / "studies.npz"
    bench.save(path)
    trained_on = bench.slice_dataset(min_lesion_mm=5.0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "dataset.json").write_text(
        json.dumps({"description": trained_on.description}), encoding="utf-8"
    )
    registry = Registry(tmp_path / "models")
    events = MemoryEvents()
    promote(registry, NAME, register(registry, study_metrics(0.5, 0.7, 0.9)), events)
    version = registry.reserve(NAME, run_dir=str(run_dir))
    export_saved_model(
        evidence_model(), CLASSES, 0.5, registry.repository / ".staging", NAME, version=version
    )
    registry.record_candidate(
        NAME,
        version,
        dataset_fingerprint=trained_on.fingerprint(),
        metrics=study_metrics(0.6, 0.8, 0.9),
        class_names=list(CLASSES),
        threshold=0.5,
        dataset_path=str(path),
    )
    scored_on: list[object] = []

    def baseline(registry, name, class_names, study_test, fingerprint):  # type: ignore[no-untyped-def]
        scored_on.append(study_test)
        return (0.5, 0.7)

    monkeypatch.setattr(lifecycle, "serving_study_baseline", baseline)
    promote(registry, NAME, version, events)
    [split] = scored_on
    assert np.array_equal(split.images, bench.test.images)
    assert registry.get(NAME, version).status == SERVING
