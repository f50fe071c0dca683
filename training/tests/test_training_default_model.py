"""``python -m training.default_model``: publish version 1 once (shipped or untrained)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from scanwatch.model_registry import SERVING, Registry
from scanwatch.model_repository import published_versions
from scanwatch.saved_model import read_signature
from schemas import model_signature
from training.default_model import (
    CLASS_NAMES,
    REEXPORT_PROBE_SEED,
    REEXPORT_TOLERANCE,
    SHIPPED,
    SHIPPED_MODEL,
    SHIPPED_REPORT,
    load_shipped_classifier,
    main,
    reexport_probe,
    reexport_shipped,
    shipped_available,
)
from training.export import export_saved_model

pytestmark = pytest.mark.integration

SALIENCY = model_signature.SALIENCY_SIGNATURE_NAME


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    """main() configures the root logger; put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_untrained_version_1_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["--repository", str(tmp_path), "--name", "brain", "--untrained", "--image-size", "32"]
    assert main(args) == 0
    version_1 = tmp_path / "brain" / "1"
    assert published_versions(tmp_path / "brain") == [1]
    modified = (version_1 / "saved_model.pb").stat().st_mtime_ns

    serve = tf.saved_model.load(str(version_1)).signatures[model_signature.SIGNATURE_NAME]
    outputs = serve(images=tf.fill((2, 32, 32, 3), 128.0))
    assert outputs["class_names"].numpy().tolist() == [[c.encode() for c in CLASS_NAMES]] * 2
    assert outputs["threshold"].numpy().tolist() == [0.5, 0.5]
    assert Registry(tmp_path).get("brain", 1).status == SERVING
    capfd.readouterr()

    assert main(args) == 0
    assert published_versions(tmp_path / "brain") == [1]
    assert (version_1 / "saved_model.pb").stat().st_mtime_ns == modified
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line[:1] == "{"]
    assert "model already has a version; nothing to do" in [entry["msg"] for entry in logged]


@pytest.mark.usefixtures("restore_logging")
def test_shipped_model_is_copied_and_registered(tmp_path: Path) -> None:
    source = tmp_path / "shipped"
    inputs = keras.Input((32, 32, 3), name="images")
    model = keras.Model(
        inputs,
        keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)),
    )
    exported = export_saved_model(model, CLASS_NAMES, 0.5, tmp_path / "export", "m")
    source.mkdir()
    exported.rename(source / SHIPPED_MODEL)
    report = {
        "macro_f1": 0.97,
        "accuracy": 0.97,
        "weighted_avg": {"f1-score": 0.97},
        "class_names": list(CLASS_NAMES),
        "dataset_fingerprint": "c" * 64,
        "anomaly": {"threshold": 0.5},
    }
    (source / SHIPPED_REPORT).write_text(json.dumps(report))

    repository = tmp_path / "models"
    assert main(["--repository", str(repository), "--source", str(source)]) == 0
    served = repository / "brain-mri-anomaly" / "1"
    assert (served / "saved_model.pb").read_bytes() == (
        source / SHIPPED_MODEL / "saved_model.pb"
    ).read_bytes()
    record = Registry(repository).get("brain-mri-anomaly", 1)
    assert (record.status, record.macro_f1, record.dataset_fingerprint) == (SERVING, 0.97, "c" * 64)


def test_the_repository_ships_a_trained_default_model() -> None:
    assert shipped_available(), f"no SavedModel in {SHIPPED / SHIPPED_MODEL}"
    report = json.loads((SHIPPED / SHIPPED_REPORT).read_text())
    assert report["class_names"] == list(CLASS_NAMES)
    per_class = [report["per_class"][c]["f1-score"] for c in CLASS_NAMES]
    assert report["macro_f1"] == pytest.approx(sum(per_class) / len(per_class))
    inputs, outputs = read_signature(SHIPPED / SHIPPED_MODEL)
    assert model_signature.check_serving(inputs, outputs) == []
    assert model_signature.HEATMAPS in outputs  # scored and explained in one pass


def test_the_shipped_model_has_the_saliency_signature_and_its_scores_did_not_change() -> None:
    """Re-exported with the Grad-CAM signature: serving_default gives, on the fixed probe, the
    probabilities the model gave as trained (``serving_default_probe.json``, written from the
    SavedModel before the re-export)."""
    inputs, outputs = read_signature(
        SHIPPED / SHIPPED_MODEL, model_signature.SALIENCY_SIGNATURE_NAME
    )
    assert model_signature.check_saliency(inputs, outputs) == []
    recorded = json.loads((SHIPPED / "serving_default_probe.json").read_text())
    assert recorded["probe"]["seed"] == REEXPORT_PROBE_SEED
    images = reexport_probe(recorded["probe"]["size"])
    loaded = tf.saved_model.load(str(SHIPPED / SHIPPED_MODEL))
    served = loaded.signatures[model_signature.SIGNATURE_NAME](images=tf.constant(images))
    np.testing.assert_allclose(
        served["probabilities"].numpy(), recorded["probabilities"], atol=REEXPORT_TOLERANCE
    )
    saliency = loaded.signatures[SALIENCY](images=tf.constant(images))
    np.testing.assert_allclose(
        saliency["probabilities"].numpy(), recorded["probabilities"], atol=REEXPORT_TOLERANCE
    )


def test_a_reexport_keeps_the_scores_and_replaces_the_model_in_place(tmp_path: Path) -> None:
    """The re-export path itself, on a copy: weights read back from the SavedModel's variables
    into build_classifier's architecture, every variable consumed, scores checked unchanged."""
    source = tmp_path / "shipped"
    shutil.copytree(SHIPPED, source, ignore=shutil.ignore_patterns("*.png"))
    before = (source / SHIPPED_MODEL / "saved_model.pb").stat().st_ino
    reexport_shipped(source)
    assert (source / SHIPPED_MODEL / "saved_model.pb").stat().st_ino != before
    assert [p.name for p in source.iterdir() if p.name.startswith(".")] == []
    inputs, outputs = read_signature(
        source / SHIPPED_MODEL, model_signature.SALIENCY_SIGNATURE_NAME
    )
    assert model_signature.check_saliency(inputs, outputs) == []


def test_the_shipped_weights_load_into_a_larger_input() -> None:
    """Issue 18 point 7's cost side: the shipped weights in a 160² graph, every variable
    consumed, the same architecture, scoring 160² images."""
    shipped = load_shipped_classifier()
    larger = load_shipped_classifier(image_size=160)
    assert shipped.input_shape[1:3] == (128, 128)
    assert larger.input_shape[1:3] == (160, 160)
    for a, b in zip(shipped.weights, larger.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    scores = larger.predict(reexport_probe(160), verbose=0)
    assert scores.shape == (8, len(CLASS_NAMES))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
