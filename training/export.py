"""Export a classifier as a SavedModel with scanwatch's serving signature and publish it.

The repository layout is TensorFlow Serving's: ``<repository>/<name>/<version>/saved_model.pb``
with integer versions. A version is written to a hidden temporary folder beside the versions,
its signature is checked against :mod:`schemas.model_signature`, and only then is it renamed
into place, so a server polling the repository never sees a half-written or wrong model.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from scanwatch.model_repository import SAVED_MODEL_FILE, TEMP_PREFIX, version_folders
from scanwatch.tensors import signature_specs
from schemas import model_signature
from schemas.model_signature import TensorSpec

logger = logging.getLogger(__name__)

SERVE_TAG = "serve"


class SignatureMismatch(ValueError):
    """The exported signature differs from :mod:`schemas.model_signature`; nothing was published."""


def read_signature_defs(saved_model_dir: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """All SignatureDefs of the ``serve`` MetaGraph of a SavedModel, as TF Serving reports them."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((Path(saved_model_dir) / SAVED_MODEL_FILE).read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{saved_model_dir} has no MetaGraph tagged {SERVE_TAG!r}")


def read_signature(
    saved_model_dir: Path, signature_name: str = model_signature.SIGNATURE_NAME
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """``(inputs, outputs)`` of a SavedModel's signature, ready for ``model_signature.check``."""
    signatures = read_signature_defs(saved_model_dir)
    if signature_name not in signatures:
        raise ValueError(f"{saved_model_dir} has no signature {signature_name!r}")
    return signature_specs(signatures[signature_name])


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


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` so a published version survives a crash."""
    for folder, _dirs, files in os.walk(root):
        for file in files:
            fd = os.open(os.path.join(folder, file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _fsync_tree(temp)
        if version is None:
            version = max(version_folders(model_dir), default=0) + 1
        target = model_dir / str(version)
        if target.exists():
            raise FileExistsError(f"{target} already exists; versions are never overwritten")
        os.rename(temp, target)  # atomic on one filesystem: the version appears complete
        _fsync_dir(model_dir)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    logger.info("published model", extra={"model_name": name, "model_version": version})
    return target
