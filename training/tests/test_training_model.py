"""The article's classifier: architecture, determinism and argument checks."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training.model import (
    BASE_LAYER,
    INPUT_NAME,
    MASK_OUTPUT,
    MASK_STRIDE,
    OUTPUT_LAYER,
    build_classifier,
    normalise_variant,
    with_mask_head,
)

pytestmark = pytest.mark.integration

CLASSES = ("normal", "glioma", "meningioma")


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_classifier(CLASSES, image_size=32, dense_units=16, dropout=0.2, seed=7)


def test_architecture(model: keras.Model) -> None:
    assert model.input_shape == (None, 32, 32, 3)
    assert model.inputs[0].name == INPUT_NAME
    assert model.output_shape == (None, len(CLASSES))
    base = model.get_layer(BASE_LAYER)
    assert base.output_shape == (None, 1280)  # EfficientNetB0 features after average pooling
    head = [layer.name for layer in model.layers[2:]]
    assert head == ["head_dense", "head_dropout", OUTPUT_LAYER]
    assert model.get_layer("head_dense").units == 16
    assert model.get_layer("head_dense").activation is keras.activations.relu
    assert model.get_layer("head_dropout").rate == 0.2
    assert model.get_layer(OUTPUT_LAYER).activation is keras.activations.softmax


def test_forward_pass_on_pixel_values_gives_probabilities(model: keras.Model) -> None:
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (3, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_same_seed_same_weights(model: keras.Model) -> None:
    again = build_classifier(CLASSES, image_size=32, dense_units=16, dropout=0.2, seed=7)
    other = build_classifier(CLASSES, image_size=32, dense_units=16, dropout=0.2, seed=8)
    weights, same, different = (
        m.get_layer("head_dense").get_weights()[0] for m in (model, again, other)
    )
    np.testing.assert_array_equal(weights, same)
    assert not np.array_equal(weights, different)


@pytest.mark.parametrize(
    ("given", "expected"), [("B0", "B0"), ("b3", "B3"), ("EfficientNetB7", "B7")]
)
def test_variants_by_name(given: str, expected: str) -> None:
    assert normalise_variant(given) == expected


def test_other_variant_is_built() -> None:
    model = build_classifier(CLASSES, image_size=32, variant="b1")
    assert model.name == "scanwatch_efficientnetb1"
    assert model.get_layer(BASE_LAYER).output_shape == (None, 1280)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"class_names": ["normal"]}, "at least 2 classes"),
        ({"class_names": "normal"}, "sequence of names"),
        ({"class_names": ["normal", "normal"]}, "unique"),
        ({"class_names": ["normal", ""]}, "non-empty"),
        ({"image_size": 16}, "image_size"),
        ({"variant": "B8"}, "B0, B1"),
        ({"weights": "/nonexistent/weights.h5"}, "weights must be"),
        ({"dense_units": 0}, "dense_units"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict, words: str) -> None:
    arguments = {"class_names": CLASSES, "image_size": 32, **arguments}
    with pytest.raises((ValueError, TypeError), match=words):
        build_classifier(**arguments)


@pytest.mark.parametrize("stride", [MASK_STRIDE, 8])
def test_a_mask_head_shares_the_classifier_and_maps_cells_of_its_stride(
    model: keras.Model, stride: int
) -> None:
    training = with_mask_head(model, stride)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    out = training(images, training=False)
    assert set(out) == {OUTPUT_LAYER, MASK_OUTPUT}
    assert out[MASK_OUTPUT].shape == (2, 32 // stride, 32 // stride, 1)
    assert 0 <= float(np.min(out[MASK_OUTPUT])) and float(np.max(out[MASK_OUTPUT])) <= 1
    # The same layers, not copies: the classifier's own output, and what training changes in
    # the training model changes in the classifier.
    np.testing.assert_allclose(out[OUTPUT_LAYER], model(images, training=False), rtol=1e-5)
    assert training.get_layer("head_dense") is model.get_layer("head_dense")
    with pytest.raises(ValueError, match=f"divisible by {stride}"):
        with_mask_head(build_classifier(CLASSES, image_size=36, dense_units=4), stride)
    with pytest.raises(ValueError, match="stride is one of"):
        with_mask_head(model, 4)
