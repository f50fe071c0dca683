"""Export a classifier as a SavedModel with scanwatch's serving signature and publish it.

The repository layout is TensorFlow Serving's: ``<repository>/<name>/<version>/saved_model.pb``
with integer versions. A version is written to a hidden temporary folder beside the versions,
its signature is checked against :mod:`schemas.model_signature`, and only then is it renamed
into place, so a server polling the repository never sees a half-written or wrong model.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

from scanwatch.durable import publish_dir
from scanwatch.model_repository import TEMP_PREFIX, version_folders
from scanwatch.saved_model import read_signature
from schemas import model_signature
from training.model import BASE_LAYER, OUTPUT_LAYER

logger = logging.getLogger(__name__)


class SignatureMismatch(ValueError):
    """The exported signature differs from :mod:`schemas.model_signature`; nothing was published."""


def _without_optimizer(model: keras.Model) -> keras.Model:
    """The same architecture and weights, without the optimizer a trained model carries: its
    slot variables would be saved too (with Adam, twice the weights again: 55 MB instead of
    21 MB for the default model) and serving never uses them."""
    if getattr(model, "optimizer", None) is None:
        return model
    copy = model.__class__.from_config(model.get_config())  # not compiled: no optimizer
    copy.set_weights(model.get_weights())
    return copy


#: The head's ReLU dense layer, as :func:`training.model.build_classifier` names it.
HEAD_DENSE_LAYER = "head_dense"
#: The last activation of Keras' EfficientNet base: the feature maps Grad-CAM weighs.
LAST_CONV_LAYER = "top_activation"
#: Keeps an all-zero Grad-CAM map at zero when it is divided by its maximum.
_HEATMAP_EPSILON = 1e-12


class ServingModule(tf.Module):
    """The model plus its class names and threshold behind the pinned serving signatures.

    ``serve`` is ``serving_default``; ``saliency`` is the Grad-CAM signature of
    :data:`schemas.model_signature.SALIENCY_OUTPUTS`. Grad-CAM is written with forward ops only
    (no ``tf.GradientTape``, so OpenVINO converts it): the head after the last convolutional
    block is GlobalAveragePooling → Dense(ReLU) → (Dropout, identity when serving) → Dense, so
    the gradient of class c's pre-softmax score z_c with respect to the pooled features is
    ``((W2[:, c] ⊙ 1[h > 0]) @ W1ᵀ)``, and Grad-CAM's weight of feature map k is that divided by
    H·W (the pooling's mean): α_k = ∂z_c/∂pooled_k / (H·W).
    """

    def __init__(self, model: keras.Model, class_names: Sequence[str], threshold: float) -> None:
        super().__init__(name="scanwatch_serving")
        self.model = _without_optimizer(model)
        self.class_names = tf.constant(list(class_names), dtype=tf.string)
        self.threshold = tf.constant(threshold, dtype=tf.float32)
        self._classes = len(class_names)
        image_shape = tuple(model.input_shape[1:])
        input_signature = [
            tf.TensorSpec((None, *image_shape), tf.float32, name=model_signature.INPUT.name)
        ]
        self.serve = tf.function(self._serve, input_signature=input_signature)
        self.saliency: tf.types.experimental.PolymorphicFunction | None = None
        if has_saliency_head(self.model):
            base = self.model.get_layer(BASE_LAYER)
            # The same layers and weights as ``model``, stopped at the last feature maps.
            self.features = keras.Model(base.inputs, base.get_layer(LAST_CONV_LAYER).output)
            self.hidden = self.model.get_layer(HEAD_DENSE_LAYER)
            self.scores = self.model.get_layer(OUTPUT_LAYER)
            self.saliency = tf.function(self._saliency, input_signature=input_signature)

    def _tiled_class_names(self, batch: tf.Tensor) -> tf.Tensor:
        # Tiled per image so every output has the batch dimension first (server-side batching).
        return tf.ensure_shape(
            tf.tile(self.class_names[tf.newaxis, :], tf.stack([batch, 1])), (None, self._classes)
        )

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        batch = tf.shape(images)[0]
        return {
            "probabilities": probabilities,
            "class_names": self._tiled_class_names(batch),
            "threshold": tf.fill([batch], self.threshold),
        }

    def _saliency(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        maps = tf.cast(self.features(images, training=False), tf.float32)  # N×H×W×K
        pooled = tf.reduce_mean(maps, axis=[1, 2])  # the base's GlobalAveragePooling
        w1, b1 = (tf.cast(v, tf.float32) for v in (self.hidden.kernel, self.hidden.bias))
        w2, b2 = (tf.cast(v, tf.float32) for v in (self.scores.kernel, self.scores.bias))
        hidden = tf.nn.relu(tf.matmul(pooled, w1) + b1)
        probabilities = tf.nn.softmax(tf.matmul(hidden, w2) + b2)
        predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        # ∂z_c/∂pooled = (W2[:, c] ⊙ 1[hidden > 0]) @ W1ᵀ; Grad-CAM's α = that / (H·W).
        through_relu = tf.gather(tf.transpose(w2), predicted) * tf.cast(hidden > 0, tf.float32)
        area = tf.cast(tf.shape(maps)[1] * tf.shape(maps)[2], tf.float32)
        alpha = tf.matmul(through_relu, w1, transpose_b=True) / area  # N×K
        cam = tf.nn.relu(tf.reduce_sum(maps * alpha[:, tf.newaxis, tf.newaxis, :], axis=-1))
        side = images.shape[1:3]
        cam = tf.image.resize(cam[..., tf.newaxis], side, method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        heatmaps = cam / tf.maximum(peak, _HEATMAP_EPSILON)
        return {
            "probabilities": probabilities,
            "class_names": self._tiled_class_names(tf.shape(images)[0]),
            model_signature.HEATMAPS: tf.ensure_shape(heatmaps, (None, *side)),
        }

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """The signatures by name, for ``tf.saved_model.save``."""
        signatures = {model_signature.SIGNATURE_NAME: self.serve.get_concrete_function()}
        if self.saliency is not None:
            signatures[model_signature.SALIENCY_SIGNATURE_NAME] = (
                self.saliency.get_concrete_function()
            )
        return signatures


def has_saliency_head(model: keras.Model) -> bool:
    """Whether ``model`` has :func:`training.model.build_classifier`'s structure, which the
    forward-only Grad-CAM of :class:`ServingModule` is written for (every model the training
    pipeline builds; hand-made test models may not)."""
    names = {layer.name for layer in model.layers}
    if not {BASE_LAYER, HEAD_DENSE_LAYER, OUTPUT_LAYER} <= names:
        return False
    base = model.get_layer(BASE_LAYER)
    return isinstance(base, keras.Model) and any(
        layer.name == LAST_CONV_LAYER for layer in base.layers
    )


def check_signatures(saved_model_dir: Path, saliency: bool = True) -> list[str]:
    """The exported signatures against the contract (empty when they hold): ``serving_default``
    always, ``saliency`` when it is expected."""
    problems: list[str] = []
    expected = [(model_signature.SIGNATURE_NAME, model_signature.OUTPUTS)]
    if saliency:
        expected.append((model_signature.SALIENCY_SIGNATURE_NAME, model_signature.SALIENCY_OUTPUTS))
    for name, outputs_spec in expected:
        try:
            inputs, outputs = read_signature(saved_model_dir, name)
        except ValueError as error:
            problems.append(str(error))
            continue
        problems += [f"{name}: {p}" for p in model_signature.check(inputs, outputs, outputs_spec)]
    return problems


def _check_export_arguments(
    model: keras.Model, class_names: Sequence[str], threshold: float, name: str
) -> None:
    if isinstance(class_names, str) or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be a sequence of unique names, got {class_names!r}")
    if model_signature.NORMAL_CLASS not in class_names:
        raise ValueError(
            f"class_names must contain {model_signature.NORMAL_CLASS!r} "
            f"(the anomaly score is 1 - p(normal)), got {list(class_names)}"
        )
    outputs = model.output_shape
    if not isinstance(outputs, tuple) or len(outputs) != 2 or outputs[-1] != len(class_names):
        raise ValueError(
            f"model output shape {outputs} does not match {len(class_names)} class names"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise ValueError(f"model name must be a plain folder name, got {name!r}")


def export_saved_model(
    model: keras.Model,
    class_names: Sequence[str],
    threshold: float,
    repository: Path,
    name: str,
    version: int | None = None,
) -> Path:
    """Publish ``model`` as ``<repository>/<name>/<version>/`` and return that folder.

        ``version=None`` takes the next integer after the highest existing version folder. The
        SavedModel's ``serving_default`` signature (and ``saliency``, exported for every model with
    :func:`training.model.build_classifier`'s structure) is checked against
        :mod:`schemas.model_signature` before the temporary folder is renamed into place;
        :class:`SignatureMismatch` means nothing was published. An existing version is never
        overwritten (:class:`FileExistsError`).
    """
    _check_export_arguments(model, class_names, threshold, name)
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be a positive integer or None, got {version!r}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    temp = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        module = ServingModule(model, class_names, threshold)
        tf.saved_model.save(module, str(temp), signatures=module.signatures())
        problems = check_signatures(temp, saliency=module.saliency is not None)
        if problems:
            raise SignatureMismatch(
                f"refusing to publish {name}: signature differs from the contract: "
                + "; ".join(problems)
            )
        if version is None:
            version = max(version_folders(model_dir), default=0) + 1
        target = model_dir / str(version)
        publish_dir(temp, target)  # versions are never overwritten: FileExistsError
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    logger.info("published model", extra={"model_name": name, "model_version": version})
    return target
