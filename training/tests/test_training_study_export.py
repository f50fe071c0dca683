"""The export of what the study evaluation chose: temperature in both signatures, study_rule."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from scanwatch.saved_model import read_signature
from scanwatch.study_score import Calibration, StudyRule
from schemas import model_signature
from training.calibration import apply_temperature
from training.export import export_saved_model
from training.model import build_classifier

pytestmark = pytest.mark.integration

CLASSES = ("normal", "mass", "bleed")
SIZE = 32
RULE = StudyRule(
    "top_k_mean",
    k=3,
    calibration=Calibration(slope=1.7, intercept=-0.4),
    operating_point="study sensitivity >= 0.95 for lesions >= 5 mm",
)


def small_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(
        inputs,
        keras.layers.Dense(
            len(CLASSES),
            activation="softmax",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.2, seed=1),
        )(pooled),
    )


def images(n: int = 4) -> np.ndarray:
    # Small values: the tiny model's probabilities stay away from 0 and 1.
    return np.random.default_rng(3).uniform(0, 20, (n, SIZE, SIZE, 3)).astype(np.float32)


def outputs(folder: Path, signature: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    serve = tf.saved_model.load(str(folder)).signatures[signature]
    return {k: v.numpy() for k, v in serve(images=tf.constant(batch)).items()}


def test_temperature_and_study_rule_are_in_serving_default(tmp_path: Path) -> None:
    model = small_model()
    folder = export_saved_model(
        model, CLASSES, 0.62, tmp_path, "brain", temperature=2.5, study_rule=RULE
    )
    inputs, specs = read_signature(folder)
    assert model_signature.check_serving(inputs, specs) == []
    assert specs["study_rule"] == model_signature.STUDY_RULE

    batch = images()
    served = outputs(folder, model_signature.SIGNATURE_NAME, batch)
    plain = model.predict(batch, verbose=0)
    np.testing.assert_allclose(
        served["probabilities"], apply_temperature(plain, 2.5), rtol=1e-4, atol=1e-6
    )
    # Softer than the model itself, same predicted class.
    assert served["probabilities"].max(axis=1).mean() < plain.max(axis=1).mean()
    np.testing.assert_array_equal(served["probabilities"].argmax(1), plain.argmax(1))
    assert served["study_rule"].shape == (len(batch),)
    assert {StudyRule.from_json(row) for row in served["study_rule"]} == {RULE}
    np.testing.assert_allclose(served["threshold"], 0.62)


def test_a_model_exported_without_them_is_unchanged(tmp_path: Path) -> None:
    model = small_model()
    folder = export_saved_model(model, CLASSES, 0.5, tmp_path, "brain")
    _inputs, specs = read_signature(folder)
    assert "study_rule" not in specs
    batch = images()
    np.testing.assert_allclose(
        outputs(folder, model_signature.SIGNATURE_NAME, batch)["probabilities"],
        model.predict(batch, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        export_saved_model(model, CLASSES, 0.5, tmp_path, "brain", temperature=0.0)


def test_both_signatures_return_the_same_tempered_probabilities(tmp_path: Path) -> None:
    model = build_classifier(CLASSES, image_size=SIZE, seed=0)
    folder = export_saved_model(
        model, CLASSES, 0.5, tmp_path, "brain", temperature=0.4, study_rule=RULE
    )
    batch = images(3)
    served = outputs(folder, model_signature.SIGNATURE_NAME, batch)
    saliency = outputs(folder, model_signature.SALIENCY_SIGNATURE_NAME, batch)
    np.testing.assert_allclose(
        saliency["probabilities"], served["probabilities"], rtol=1e-4, atol=1e-6
    )
    plain = model.predict(batch, verbose=0)
    np.testing.assert_allclose(
        served["probabilities"], apply_temperature(plain, 0.4), rtol=1e-3, atol=1e-5
    )
    assert np.isfinite(saliency["heatmaps"]).all()
