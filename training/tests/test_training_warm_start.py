"""Warm start: a run can begin from the weights of a model scanwatch exported
(``--init-from``), e.g. the shipped default model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training.default_model import SHIPPED, SHIPPED_MODEL
from training.export import load_exported_weights
from training.lifecycle import StudiesSpec, load_dataset
from training.model import build_classifier

CLASSES = ("normal", "mass", "bleed", "infarct")


def test_a_fresh_classifier_answers_as_the_exported_model_once_loaded() -> None:
    model = build_classifier(CLASSES, image_size=128)
    images = np.random.default_rng(0).uniform(0, 255, (3, 128, 128, 3)).astype(np.float32)
    served = tf.saved_model.load(str(SHIPPED / SHIPPED_MODEL)).signatures["serving_default"]
    expected = served(images=tf.constant(images))["probabilities"].numpy()
    assert np.abs(model(images, training=False).numpy() - expected).max() > 1e-3
    load_exported_weights(model, SHIPPED / SHIPPED_MODEL)
    np.testing.assert_allclose(model(images, training=False).numpy(), expected, atol=1e-5)


def test_another_head_is_refused() -> None:
    model = build_classifier(("normal", "other"), image_size=128)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_exported_weights(model, SHIPPED / SHIPPED_MODEL)


def test_the_studies_dataset_names_its_presets(tmp_path: Path) -> None:
    from training.config import TrainSettings

    with pytest.raises(ValueError, match="presets default, tiny, not 'large'"):
        load_dataset(StudiesSpec(preset="large"), TrainSettings(cache_dir=tmp_path), tmp_path)
