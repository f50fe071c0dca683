"""The article's classifier: an EfficientNet base, a ReLU dense layer, dropout and a softmax.

Input is what :func:`scanwatch.imaging.preprocess_slice` produces: float32 RGB in [0, 255]
(Keras' EfficientNet rescales and normalises internally, so no scaling happens here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import keras

#: EfficientNet variants by name; B0 is the article's default.
VARIANTS: dict[str, Callable[..., keras.Model]] = {
    "B0": keras.applications.EfficientNetB0,
    "B1": keras.applications.EfficientNetB1,
    "B2": keras.applications.EfficientNetB2,
    "B3": keras.applications.EfficientNetB3,
    "B4": keras.applications.EfficientNetB4,
    "B5": keras.applications.EfficientNetB5,
    "B6": keras.applications.EfficientNetB6,
    "B7": keras.applications.EfficientNetB7,
}
#: Keras' EfficientNet refuses smaller inputs when ``include_top=False``.
MIN_IMAGE_SIZE = 32
IMAGENET = "imagenet"
#: Name of the EfficientNet sub-model inside the classifier (fine-tuning unfreezes its top).
BASE_LAYER = "efficientnet"
INPUT_NAME = "images"
OUTPUT_LAYER = "probabilities"
HEAD_DENSE, HEAD_DROPOUT = "head_dense", "head_dropout"
#: The mask head's output (training only: the served model is the classifier without it).
MASK_OUTPUT = "lesion_map"
#: The base's block a mask head reads, by the head's stride: one cell per stride² pixels, from
#: the last layer of that block (block3 ends at stride 8, block5 at stride 16).
MASK_BLOCKS = {8: "block3", 16: "block5"}
#: The default stride of a mask head.
MASK_STRIDE = 16


def normalise_variant(variant: str) -> str:
    """``"b3"``, ``"B3"`` or ``"EfficientNetB3"`` → ``"B3"``; anything else is a ValueError."""
    key = variant.strip().upper().removeprefix("EFFICIENTNET")
    if key not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    return key


def _check_arguments(
    class_names: Sequence[str],
    image_size: int,
    weights: str | None,
    dense_units: int,
    dropout: float,
) -> None:
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of names, not a single string")
    names = list(class_names)
    if len(names) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {names}")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError(f"class names must be non-empty strings, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if weights not in (None, IMAGENET) and not Path(weights).is_file():
        raise ValueError(
            f"weights must be None (from scratch), {IMAGENET!r} or an existing weights file, "
            f"got {weights!r}"
        )
    if not isinstance(dense_units, int) or dense_units < 1:
        raise ValueError(f"dense_units must be a positive integer, got {dense_units!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def build_classifier(
    class_names: Sequence[str],
    image_size: int = 224,
    variant: str = "B0",
    weights: str | None = None,
    dense_units: int = 256,
    dropout: float = 0.3,
    seed: int = 0,
) -> keras.Model:
    """EfficientNet (``include_top=False``, average pooling) → Dense(ReLU) → Dropout → softmax.

    ``weights``: ``None`` trains from scratch, ``"imagenet"`` loads Keras' ImageNet weights
    (downloaded or from the Keras cache), or a path to a local weights file for the base.
    ``seed`` seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``) so that the same
    arguments give the same initial weights.
    """
    _check_arguments(class_names, image_size, weights, dense_units, dropout)
    key = normalise_variant(variant)
    keras.utils.set_random_seed(seed)
    shape = (image_size, image_size, 3)
    try:
        base = VARIANTS[key](
            include_top=False, weights=weights, input_shape=shape, pooling="avg", name=BASE_LAYER
        )
    except Exception as error:  # download failure, corrupt or mismatched weights file
        if weights is None:
            raise
        raise RuntimeError(
            f"could not load {weights!r} weights for EfficientNet{key} ({error}); "
            "pass weights=None to train from scratch or a local weights file"
        ) from error
    inputs = keras.Input(shape=shape, dtype="float32", name=INPUT_NAME)
    features = base(inputs)
    hidden = keras.layers.Dense(dense_units, activation="relu", name=HEAD_DENSE)(features)
    hidden = keras.layers.Dropout(dropout, seed=seed, name=HEAD_DROPOUT)(hidden)
    outputs = keras.layers.Dense(len(class_names), activation="softmax", name=OUTPUT_LAYER)(hidden)
    return keras.Model(inputs, outputs, name=f"scanwatch_efficientnet{key.lower()}")


def with_mask_head(classifier: keras.Model, stride: int = MASK_STRIDE) -> keras.Model:
    """A training model around ``classifier`` (:func:`build_classifier`'s; its layers shared,
    not copied) that also outputs :data:`MASK_OUTPUT`: per ``stride``² cell, the probability
    that a lesion covers it, from a small head on the base's last block of that stride
    (:data:`MASK_BLOCKS`: 8 reads an earlier, finer block, so its gradients reach the layers
    that see a few-pixel lesion).

    Learning where the lesion is, not only that there is one, is the dense supervision that
    detection and segmentation models train with; the classifier is what is exported and
    served, unchanged in shape.
    """
    if stride not in MASK_BLOCKS:
        raise ValueError(f"a mask head's stride is one of {sorted(MASK_BLOCKS)}, not {stride}")
    base = classifier.get_layer(BASE_LAYER)
    size = int(classifier.input_shape[1])
    if size % stride:
        raise ValueError(f"a mask head needs an image size divisible by {stride}, not {size}")
    block = [layer for layer in base.layers if layer.name.startswith(MASK_BLOCKS[stride])][-1]
    inner = keras.Model(base.inputs, [block.output, base.output], name=f"{BASE_LAYER}_maps")
    images = keras.Input(shape=classifier.input_shape[1:], dtype="float32", name=INPUT_NAME)
    feature_map, pooled = inner(images)
    hidden = pooled
    for name in (HEAD_DENSE, HEAD_DROPOUT, OUTPUT_LAYER):
        hidden = classifier.get_layer(name)(hidden)
    cells = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="lesion_map_conv")(
        feature_map
    )
    cells = keras.layers.Conv2D(1, 1, activation="sigmoid", name=MASK_OUTPUT)(cells)
    return keras.Model(images, {OUTPUT_LAYER: hidden, MASK_OUTPUT: cells}, name=classifier.name)
