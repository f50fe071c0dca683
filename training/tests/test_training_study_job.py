"""A training job on the tiny study benchmark, end to end: the study rule, temperature and
threshold chosen on validation studies are exported with the model, recorded in the registry
and reported; promotion from the CLI compares on the study test split."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from scanwatch.model_registry import (
    EVALUATION_DIR,
    REJECTED,
    REPORT_JSON,
    REPORT_MARKDOWN,
    SERVING,
    STUDY_AUROC,
    STUDY_SENSITIVITY_AT_SPECIFICITY,
    Registry,
    study_metrics,
)
from scanwatch.saved_model import read_signature
from scanwatch.study_score import StudyRule
from schemas import model_signature
from training.cli import main
from training.export import export_saved_model
from training.study_evaluation import STUDY_BINS_PNG, STUDY_FROC_PNG, STUDY_RELIABILITY_PNG
from training.train import BY_SELECT, STATE_FILE

pytestmark = pytest.mark.integration

NAME = "brain-mri-anomaly"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCANWATCH_TRAIN_CACHE_DIR", str(root / "cache"))
    mp.delenv("SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    try:
        code = main(
            [
                "train",
                "--dataset",
                "studies",
                "--preset",
                "tiny",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                # Trained without the lesion slices narrower than 5 mm: promotion below has to
                # rebuild the same training data to find the study test split.
                "--min-lesion-mm",
                "5",
                "--repository",
                str(root / "models"),
                "--run-dir",
                str(root / "run"),
            ]
        )
    finally:
        mp.undo()
    assert code == 0
    return root


def test_the_chosen_rule_is_exported_recorded_and_reported(trained: Path) -> None:
    registry = Registry(trained / "models")
    record = registry.get(NAME, 1)
    assert record.status == SERVING
    report = json.loads((trained / "run" / EVALUATION_DIR / REPORT_JSON).read_text())
    study = report["study"]
    rule = StudyRule.from_json(study["rule"]["json"])
    assert record.threshold == pytest.approx(study["threshold"])
    assert record.metrics[STUDY_SENSITIVITY_AT_SPECIFICITY] == pytest.approx(
        study["test"]["promotion"][STUDY_SENSITIVITY_AT_SPECIFICITY]
    )
    assert STUDY_AUROC in record.metrics
    recorded = json.loads((trained / "run" / "dataset.json").read_text())
    assert recorded["description"]["train_min_lesion_mm"] == 5
    # The epoch kept is the one the validation studies ranked best, each epoch's figures kept.
    state = json.loads((trained / "run" / STATE_FILE).read_text())
    assert state["selected_by"] == BY_SELECT
    best = state["history"][state["best_epoch"] - 1]
    assert state["best_selection"] == best["val_lesion_slice_auroc"]
    assert all(-1 <= h["val_study_auroc"] <= 1 for h in state["history"])

    folder = registry.model_dir(NAME) / "1"
    inputs, outputs = read_signature(folder)
    assert model_signature.check_serving(inputs, outputs) == []
    serve = tf.saved_model.load(str(folder)).signatures[model_signature.SIGNATURE_NAME]
    size = inputs["images"].shape[1]
    served = serve(images=tf.zeros((2, size, size, 3)))
    assert StudyRule.from_json(served["study_rule"].numpy()[0]) == rule
    np.testing.assert_allclose(served["threshold"].numpy(), study["threshold"], rtol=1e-6)
    assert study["temperature"]["value"] > 0

    markdown = (trained / "run" / EVALUATION_DIR / REPORT_MARKDOWN).read_text()
    assert "## Study level" in markdown and rule.name in markdown
    for png in (STUDY_RELIABILITY_PNG, STUDY_FROC_PNG, STUDY_BINS_PNG):
        assert (trained / "run" / EVALUATION_DIR / png).stat().st_size > 10_000


def test_cli_promotion_compares_on_the_study_test_split(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(trained / "models")
    served = registry.get(NAME, 1)
    size = read_signature(registry.model_dir(NAME) / "1")[0]["images"].shape[1]
    version = registry.reserve(NAME, run_dir=served.run_dir)  # trained on the same data
    inputs = keras.Input((size, size, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(pooled))
    export_saved_model(
        model, served.class_names, 0.5, registry.repository / ".staging", NAME, version=version
    )
    registry.record_candidate(
        NAME,
        version,
        dataset_fingerprint=served.dataset_fingerprint or "",
        # A better slice macro-F1 than anything, but worse on studies than the served version.
        metrics={"macro_f1": 1.0, STUDY_SENSITIVITY_AT_SPECIFICITY: -1.0, STUDY_AUROC: 0.0},
        class_names=served.class_names,
        threshold=0.5,
        dataset_path=served.dataset_path,
    )
    repository = ["--repository", str(trained / "models")]
    assert main(["models", "promote", str(version), *repository]) == 1
    assert "study test split" in capsys.readouterr().err
    assert registry.get(NAME, version).status == REJECTED


def test_evaluate_and_operating_point_without_retraining(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCANWATCH_TRAIN_CACHE_DIR", str(trained / "cache"))
    monkeypatch.setenv("SCANWATCH_TRAIN_RUNS_DIR", str(trained / "runs"))
    repository = ["--repository", str(trained / "models")]
    studies = ["--dataset", "studies", "--preset", "tiny"]
    registry = Registry(trained / "models")
    served = registry.get(NAME, 1)
    first_rule = StudyRule.from_json(
        json.loads((trained / "run" / EVALUATION_DIR / REPORT_JSON).read_text())["study"]["rule"][
            "json"
        ]
    )

    # evaluate: the served version on the study test split, with its own rule and threshold.
    out = trained / "evaluate"
    assert main(["evaluate", *studies, "--out", str(out), *repository]) == 0
    evaluated = json.loads((out / REPORT_JSON).read_text())["study"]
    assert evaluated["threshold"] == pytest.approx(served.threshold)
    assert evaluated["rule"]["json"] == first_rule.to_json()
    assert "## Study level" in capsys.readouterr().out

    # operating-point: a lower sensitivity target gives a threshold at least as high, on the
    # same weights, aggregation and calibration, as a new candidate version.
    code = main(
        ["operating-point", *studies, "--target-sensitivity", "0.5", "--min-diameter-mm", "5"]
        + repository
    )
    assert code == 0
    version = max(r.version for r in registry.versions(NAME))
    record = registry.get(NAME, version)
    assert record.status == "candidate" and record.threshold is not None
    assert record.threshold >= served.threshold  # type: ignore[operator]
    folder = registry.location(NAME, version)
    assert folder is not None
    size = read_signature(folder)[0]["images"].shape[1]
    batch = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)), tf.float32)
    new = tf.saved_model.load(str(folder)).signatures
    old = tf.saved_model.load(str(registry.model_dir(NAME) / "1")).signatures
    new_out = new[model_signature.SIGNATURE_NAME](images=batch)
    old_out = old[model_signature.SIGNATURE_NAME](images=batch)
    np.testing.assert_allclose(new_out["probabilities"], old_out["probabilities"], rtol=1e-6)
    np.testing.assert_allclose(new_out["threshold"].numpy(), record.threshold, rtol=1e-6)
    rule = StudyRule.from_json(new_out["study_rule"].numpy()[0])
    assert rule.aggregation == first_rule.aggregation and rule.calibration == first_rule.calibration
    assert rule.operating_point.startswith("study sensitivity >= 0.5 ")
    np.testing.assert_allclose(
        new[model_signature.SALIENCY_SIGNATURE_NAME](images=batch)["heatmaps"],
        old[model_signature.SALIENCY_SIGNATURE_NAME](images=batch)["heatmaps"],
        atol=1e-6,
    )
    assert f"models promote {version}" in capsys.readouterr().out
    # The candidate carries its own study metrics, measured through its SavedModel. Version 1's
    # were measured at training, through the Keras model: this tiny model's scores are nearly
    # tied, and the two paths broke the ties differently in CI (AUROC 0.5 against 0.5556 on the
    # same weights), so the registry's rule may rank it below version 1. That rule is tested
    # above; here the operator promotes it anyway, as after choosing an operating point.
    assert study_metrics(record.metrics) is not None
    assert main(["models", "promote", str(version), "--force", *repository]) == 0
    assert registry.served_versions(NAME)[-1] == version

    assert main(["operating-point", *repository]) == 2
    assert "needs studies" in capsys.readouterr().err


def test_a_mask_head_trains_beside_the_classifier_and_is_not_exported(tmp_path: Path) -> None:
    """``--mask-weight``: the run learns each slice's lesion mask too (its loss in every epoch's
    history), and what is exported is the classifier, its signature the contract's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SCANWATCH_TRAIN_CACHE_DIR", str(tmp_path / "cache"))
    mp.delenv("SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    try:
        argv = ["train", "--dataset", "studies", "--preset", "tiny", "--epochs", "2"]
        code = main(
            [
                *argv,
                "--batch-size",
                "16",
                "--mask-weight",
                "2",
                "--mask-stride",
                "8",
                "--repository",
                str(tmp_path / "models"),
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    finally:
        mp.undo()
    assert code == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["mask_weight"] == 2 and settings["mask_stride"] == 8
    recorded = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert recorded["description"]["config"]["lesion_masks"] is True
    history = json.loads((tmp_path / "run" / STATE_FILE).read_text())["history"]
    assert len(history) == 2
    assert all(h["mask_loss"] > 0 and 0 <= h["accuracy"] <= 1 for h in history)
    folder = Registry(tmp_path / "models").model_dir(NAME) / "1"
    inputs, outputs = read_signature(folder)
    assert model_signature.check_serving(inputs, outputs) == []
    assert "lesion_map" not in outputs
