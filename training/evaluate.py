"""The evaluation report: per-class precision, recall, F1 and support, confusion matrix, ROC AUC.

:func:`evaluate_probabilities` computes the numbers; :func:`write_report` writes them as
``evaluation.json``, ``evaluation.md`` and PNG plots (training curves, confusion matrix, ROC
curves) into a folder. A report with a ``study`` section (a study benchmark's, from
:mod:`training.study_evaluation`) gets it in all three, after the slice table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from scanwatch.durable import write_text_atomic
from scanwatch.model_registry import REPORT_JSON, REPORT_MARKDOWN
from schemas.model_signature import NORMAL_CLASS
from training.study_evaluation import flagged, study_markdown, write_study_plots

CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"


def evaluate_probabilities(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str], threshold: float
) -> dict[str, Any]:
    """All metrics of predictions ``probabilities`` (N × classes) against integer ``labels``."""
    names = list(class_names)
    indices = list(range(len(names)))
    predicted = probabilities.argmax(axis=1)
    report = classification_report(
        labels, predicted, labels=indices, target_names=names, output_dict=True, zero_division=0
    )
    per_class = {
        name: {k: float(v) if k != "support" else int(v) for k, v in report[name].items()}
        for name in names
    }
    one_hot = np.eye(len(names))[labels]
    auc: dict[str, float | None] = {}
    for index, name in enumerate(names):
        present = one_hot[:, index]
        auc[name] = (
            float(roc_auc_score(present, probabilities[:, index]))
            if 0 < present.sum() < len(present)
            else None
        )
    defined = [v for v in auc.values() if v is not None]
    result: dict[str, Any] = {
        "images": int(len(labels)),
        "class_names": names,
        "per_class": per_class,
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 0.0,
        "macro_avg": {k: float(v) for k, v in report["macro avg"].items()},
        "weighted_avg": {k: float(v) for k, v in report["weighted avg"].items()},
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=indices).tolist(),
        "roc_auc": {"per_class": auc, "macro": float(np.mean(defined)) if defined else None},
    }
    if NORMAL_CLASS in names:
        # The served decision (the worker's, training.study_evaluation.flagged): abnormal when
        # 1 - p(normal) is above the threshold.
        normal = names.index(NORMAL_CLASS)
        score = 1.0 - probabilities[:, normal]
        abnormal = labels != normal
        flags = flagged(score, threshold)
        result["anomaly"] = {
            "threshold": threshold,
            "sensitivity": float(flags[abnormal].mean()) if abnormal.any() else None,
            "specificity": float((~flags[~abnormal]).mean()) if (~abnormal).any() else None,
            "roc_auc": float(roc_auc_score(abnormal, score))
            if 0 < abnormal.sum() < len(abnormal)
            else None,
        }
    return result


def predict_fn_metrics(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """Evaluate any ``images → probabilities`` callable (a Keras model, a SavedModel)."""
    return evaluate_probabilities(predict(images), labels, class_names, threshold)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown(report: dict[str, Any], title: str = "Evaluation") -> str:
    """The report as a Markdown page (per-class table first)."""
    lines = [
        f"# {title}",
        "",
        f"Images: {report['images']}",
        "",
        "| class | precision | recall | f1-score | support | ROC AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in report["class_names"]:
        row = report["per_class"][name]
        auc = report["roc_auc"]["per_class"][name]
        lines.append(
            f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | "
            f"{row['support']} | {'n/a' if auc is None else f'{auc:.4f}'} |"
        )
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = report[key]
        lines.append(
            f"| **{label}** | {row['precision']:.4f} | {row['recall']:.4f} | "
            f"{row['f1-score']:.4f} | {int(row['support'])} | |"
        )
    summary = f"Accuracy: {report['accuracy']:.4f} · macro-F1: {report['macro_f1']:.4f}"
    macro_auc = report["roc_auc"]["macro"]
    if macro_auc is not None:
        summary += f" · macro ROC AUC (one-vs-rest): {macro_auc:.4f}"
    lines += ["", summary]
    anomaly = report.get("anomaly")
    if anomaly:
        lines += [
            "",
            f"Anomaly decision (1 − p(normal) ≥ {anomaly['threshold']}): "
            f"sensitivity {_number(anomaly['sensitivity'])}, "
            f"specificity {_number(anomaly['specificity'])}, "
            f"ROC AUC {_number(anomaly['roc_auc'])}",
        ]
    names = report["class_names"]
    lines += [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| true \\ predicted | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    text = "\n".join(lines) + "\n"
    if report.get("study"):
        text += "\n" + study_markdown(report["study"])
    return text


def _plots(
    report: dict[str, Any],
    probabilities: np.ndarray | None,
    labels: np.ndarray | None,
    history: list[dict[str, Any]] | None,
    out_dir: Path,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = report["class_names"]
    if history:
        epochs = [h["epoch"] for h in history]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for key, axis in (
            ("loss", left),
            ("val_loss", left),
            ("accuracy", right),
            ("val_accuracy", right),
            ("val_macro_f1", right),
        ):
            axis.plot(epochs, [h.get(key) for h in history], marker=".", label=key)
        phase_change = [
            h["epoch"]
            for p, h in zip(history, history[1:], strict=False)
            if p["phase"] != h["phase"]
        ]
        for axis in (left, right):
            for epoch in phase_change:
                axis.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=0.8)
            axis.set_xlabel("epoch")
            axis.legend()
        left.set_title("loss")
        right.set_title("accuracy / macro-F1")
        fig.tight_layout()
        fig.savefig(out_dir / CURVES_PNG, dpi=100)
        plt.close(fig)
        written.append(out_dir / CURVES_PNG)

    matrix = np.array(report["confusion_matrix"])
    fig, axis = plt.subplots(figsize=(5, 4.5))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=45)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
        )
    fig.tight_layout()
    fig.savefig(out_dir / CONFUSION_PNG, dpi=100)
    plt.close(fig)
    written.append(out_dir / CONFUSION_PNG)

    if probabilities is not None and labels is not None:
        fig, axis = plt.subplots(figsize=(5, 4.5))
        for index, name in enumerate(names):
            present = labels == index
            if 0 < present.sum() < len(labels):
                fpr, tpr, _ = roc_curve(present, probabilities[:, index])
                auc = report["roc_auc"]["per_class"][name]
                axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        axis.set_xlabel("false positive rate")
        axis.set_ylabel("true positive rate")
        axis.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / ROC_PNG, dpi=100)
        plt.close(fig)
        written.append(out_dir / ROC_PNG)
    return written


def write_report(
    report: dict[str, Any],
    out_dir: Path,
    *,
    probabilities: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    history: list[dict[str, Any]] | None = None,
    title: str = "Evaluation",
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write JSON, Markdown and PNG plots into ``out_dir``; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {**(extra or {}), **report}
    write_text_atomic(out_dir / REPORT_JSON, json.dumps(document, indent=2))
    (out_dir / REPORT_MARKDOWN).write_text(markdown(report, title))
    return [
        out_dir / REPORT_JSON,
        out_dir / REPORT_MARKDOWN,
        *_plots(report, probabilities, labels, history, out_dir),
        *(write_study_plots(report["study"], out_dir) if report.get("study") else []),
    ]
