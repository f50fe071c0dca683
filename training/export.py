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


class ServingModule(tf.Module):
    """The model plus its class names and threshold behind the pinned serving signature."""

    def __init__(self, model: keras.Model, class_names: Sequence[str], threshold: float) -> None:
        super().__init__(name="scanwatch_serving")
        self.model = _without_optimizer(model)
        self.class_names = tf.constant(list(class_names), dtype=tf.string)
        self.threshold = tf.constant(threshold, dtype=tf.float32)
        self._classes = len(class_names)
        image_shape = tuple(model.input_shape[1:])
        self.serve = tf.function(
            self._serve,
            input_signature=[
                tf.TensorSpec((None, *image_shape), tf.float32, name=model_signature.INPUT.name)
            ],
        )

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        batch = tf.shape(images)[0]
        # Tiled per image so every output has the batch dimension first (server-side batching).
        class_names = tf.ensure_shape(
            tf.tile(self.class_names[tf.newaxis, :], tf.stack([batch, 1])), (None, self._classes)
        )
        return {
            "probabilities": probabilities,
            "class_names": class_names,
            "threshold": tf.fill([batch], self.threshold),
        }


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
    SavedModel's ``serving_default`` signature is checked against
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
        tf.saved_model.save(
            module, str(temp), signatures={model_signature.SIGNATURE_NAME: module.serve}
        )
        inputs, outputs = read_signature(temp)
        problems = model_signature.check(inputs, outputs)
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
