"""Evaluation report: numbers checked against hand-computed values, files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.evaluate import (
    CONFUSION_PNG,
    CURVES_PNG,
    REPORT_JSON,
    REPORT_MARKDOWN,
    ROC_PNG,
    evaluate_probabilities,
    write_report,
)

CLASSES = ("normal", "mass", "bleed")
LABELS = np.array([0, 0, 1, 1, 2, 2])
# Predictions: normal right twice, one mass called bleed, bleed right twice.
PROBABILITIES = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.7, 0.2, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.3, 0.6],
        [0.1, 0.1, 0.8],
        [0.2, 0.1, 0.7],
    ]
)


def test_per_class_table_and_averages() -> None:
    report = evaluate_probabilities(PROBABILITIES, LABELS, CLASSES, threshold=0.5)
    assert report["per_class"]["normal"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 2}
    )
    assert report["per_class"]["mass"]["recall"] == pytest.approx(0.5)
    assert report["per_class"]["mass"]["precision"] == pytest.approx(1.0)
    assert report["per_class"]["bleed"]["precision"] == pytest.approx(2 / 3)
    mass_f1, bleed_f1 = 2 * 0.5 / 1.5, 2 * (2 / 3) / (5 / 3)
    assert report["macro_f1"] == pytest.approx((1 + mass_f1 + bleed_f1) / 3)
    assert report["weighted_avg"]["f1-score"] == pytest.approx((1 + mass_f1 + bleed_f1) / 3)
    assert report["accuracy"] == pytest.approx(5 / 6)
    assert report["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert report["roc_auc"]["per_class"]["normal"] == pytest.approx(1.0)
    assert 0.5 < report["roc_auc"]["macro"] <= 1.0
    anomaly = report["anomaly"]
    assert anomaly["sensitivity"] == 1.0 and anomaly["specificity"] == 1.0


def test_a_score_at_the_threshold_is_not_flagged_as_the_worker_decides() -> None:
    # Scores 1 - p(normal): 0.2, 0.3 (normal), 0.9, 0.9, 0.9, 0.8 (abnormal). At threshold 0.8
    # the worker (score > threshold) does not flag the last abnormal one.
    report = evaluate_probabilities(PROBABILITIES, LABELS, CLASSES, threshold=0.8)
    assert report["anomaly"]["sensitivity"] == pytest.approx(3 / 4)
    assert report["anomaly"]["specificity"] == 1.0


def test_auc_is_none_for_an_absent_class() -> None:
    report = evaluate_probabilities(PROBABILITIES[:4], LABELS[:4], CLASSES, threshold=0.5)
    assert report["roc_auc"]["per_class"]["bleed"] is None
    assert report["per_class"]["bleed"]["support"] == 0


def test_report_files(tmp_path: Path) -> None:
    report = evaluate_probabilities(PROBABILITIES, LABELS, CLASSES, threshold=0.5)
    history = [
        {
            "epoch": e,
            "phase": "initial" if e < 3 else "fine-tune",
            "loss": 1 / e,
            "val_loss": 1.2 / e,
            "accuracy": 0.5,
            "val_accuracy": 0.5,
            "val_macro_f1": 0.4,
        }
        for e in range(1, 5)
    ]
    written = write_report(
        report,
        tmp_path,
        probabilities=PROBABILITIES,
        labels=LABELS,
        history=history,
        extra={"model_version": 3},
    )
    names = {p.name for p in written}
    assert names == {REPORT_JSON, REPORT_MARKDOWN, CURVES_PNG, CONFUSION_PNG, ROC_PNG}
    for png in (CURVES_PNG, CONFUSION_PNG, ROC_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((tmp_path / REPORT_JSON).read_text())
    assert document["model_version"] == 3 and document["macro_f1"] == report["macro_f1"]
    page = (tmp_path / REPORT_MARKDOWN).read_text()
    assert "| mass | 1.0000 | 0.5000 | 0.6667 | 2 |" in page
    assert "| **macro avg** |" in page and "| **weighted avg** |" in page
    assert "| mass | 0 | 1 | 1 |" in page
