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
from typing import Any

import keras
import tensorflow as tf

from scanwatch.durable import publish_dir
from scanwatch.model_repository import TEMP_PREFIX, version_folders
from scanwatch.saved_model import read_signature
from scanwatch.study_score import StudyRule
from schemas import model_signature
from training.calibration import PROBABILITY_FLOOR
from training.model import BASE_LAYER, HEAD_DENSE, OUTPUT_LAYER

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


#: The last activation of Keras' EfficientNet base: the feature maps Grad-CAM weighs.
LAST_CONV_LAYER = "top_activation"
#: Keeps an all-zero Grad-CAM map at zero when it is divided by its maximum.
_HEATMAP_EPSILON = 1e-12


class ServingModule(tf.Module):
    """The model plus its class names, threshold, temperature and study rule behind the pinned
    serving signatures.

    ``temperature`` T (fitted on validation, :func:`training.calibration.fit_temperature`) is
    part of the graph: both signatures return ``softmax(z / T)`` of the model's pre-softmax
    scores z, which is ``softmax(log(p) / T)`` of its probabilities p, so ``serving_default``
    and ``saliency`` keep returning the same numbers and argmax (hence Grad-CAM's class) does
    not change. ``study_rule`` (a :class:`scanwatch.study_score.StudyRule`) becomes the
    optional ``study_rule`` output of ``serving_default``, the same JSON row for every image.

    ``serve`` is ``serving_default``; ``saliency`` is the Grad-CAM signature of
    :data:`schemas.model_signature.SALIENCY_OUTPUTS`. A model with that structure returns the
    same heatmaps from ``serving_default`` too (its optional ``heatmaps`` output), computed in
    the pass that scores the images. Grad-CAM is written with forward ops only
    (no ``tf.GradientTape``, so OpenVINO converts it): the head after the last convolutional
    block is GlobalAveragePooling → Dense(ReLU) → (Dropout, identity when serving) → Dense, so
    the gradient of class c's pre-softmax score z_c with respect to the pooled features is
    ``((W2[:, c] ⊙ 1[h > 0]) @ W1ᵀ)``, and Grad-CAM's weight of feature map k is that divided by
    H·W (the pooling's mean): α_k = ∂z_c/∂pooled_k / (H·W).
    """

    def __init__(
        self,
        model: keras.Model,
        class_names: Sequence[str],
        threshold: float,
        temperature: float = 1.0,
        study_rule: StudyRule | None = None,
    ) -> None:
        super().__init__(name="scanwatch_serving")
        self.model = _without_optimizer(model)
        self.class_names = tf.constant(list(class_names), dtype=tf.string)
        self.threshold = tf.constant(threshold, dtype=tf.float32)
        self._classes = len(class_names)
        self.temperature = float(temperature)
        self.study_rule = None if study_rule is None else tf.constant(study_rule.to_json())
        # The pre-softmax scores, when the model ends in a softmax Dense layer (every model
        # build_classifier makes): temperature on them is exact, where log(p) loses the
        # probabilities that underflowed to the floor.
        last = self.model.layers[-1]
        self._logit_layer: keras.layers.Dense | None = None
        if (
            self.temperature != 1.0
            and isinstance(last, keras.layers.Dense)
            and last.activation is keras.activations.softmax
        ):
            self._logit_layer = last
            self._before_logits = keras.Model(self.model.inputs, last.input)
        image_shape = tuple(model.input_shape[1:])
        input_signature = [
            tf.TensorSpec((None, *image_shape), tf.float32, name=model_signature.INPUT.name)
        ]
        self.saliency: tf.types.experimental.PolymorphicFunction | None = None
        if has_saliency_head(self.model):
            base = self.model.get_layer(BASE_LAYER)
            # The same layers and weights as ``model``, stopped at the last feature maps.
            self.features = keras.Model(base.inputs, base.get_layer(LAST_CONV_LAYER).output)
            self.hidden = self.model.get_layer(HEAD_DENSE)
            self.scores = self.model.get_layer(OUTPUT_LAYER)
            self.saliency = tf.function(self._saliency, input_signature=input_signature)
        self.serve = tf.function(self._serve, input_signature=input_signature)

    def _tiled_class_names(self, batch: tf.Tensor) -> tf.Tensor:
        # Tiled per image so every output has the batch dimension first (server-side batching).
        return tf.ensure_shape(
            tf.tile(self.class_names[tf.newaxis, :], tf.stack([batch, 1])), (None, self._classes)
        )

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        heatmaps = None
        if self.saliency is not None:  # the score and its evidence from one pass
            probabilities, heatmaps = self._explained(images)
        elif self._logit_layer is not None:
            hidden = tf.cast(self._before_logits(images, training=False), tf.float32)
            kernel, bias = (
                tf.cast(v, tf.float32) for v in (self._logit_layer.kernel, self._logit_layer.bias)
            )
            probabilities = tf.nn.softmax((tf.matmul(hidden, kernel) + bias) / self.temperature)
        else:
            probabilities = tf.cast(self.model(images, training=False), tf.float32)
            if self.temperature != 1.0:
                logits = tf.math.log(tf.maximum(probabilities, PROBABILITY_FLOOR))
                probabilities = tf.nn.softmax(logits / self.temperature)
        batch = tf.shape(images)[0]
        outputs = {
            "probabilities": probabilities,
            "class_names": self._tiled_class_names(batch),
            "threshold": tf.fill([batch], self.threshold),
        }
        if heatmaps is not None:
            outputs[model_signature.HEATMAPS] = heatmaps
        if self.study_rule is not None:
            outputs[model_signature.STUDY_RULE.name] = tf.fill([batch], self.study_rule)
        return outputs

    def _saliency(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities, heatmaps = self._explained(images)
        return {
            "probabilities": probabilities,
            "class_names": self._tiled_class_names(tf.shape(images)[0]),
            model_signature.HEATMAPS: heatmaps,
        }

    def _explained(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The probabilities of ``images`` and the Grad-CAM heatmap of each one's most probable
        class, from one pass through the network."""
        maps = tf.cast(self.features(images, training=False), tf.float32)  # N×H×W×K
        pooled = tf.reduce_mean(maps, axis=[1, 2])  # the base's GlobalAveragePooling
        w1, b1 = (tf.cast(v, tf.float32) for v in (self.hidden.kernel, self.hidden.bias))
        w2, b2 = (tf.cast(v, tf.float32) for v in (self.scores.kernel, self.scores.bias))
        hidden = tf.nn.relu(tf.matmul(pooled, w1) + b1)
        logits = tf.matmul(hidden, w2) + b2
        if self.temperature != 1.0:
            logits = logits / self.temperature
        probabilities = tf.nn.softmax(logits)
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
        return probabilities, tf.ensure_shape(heatmaps, (None, *side))

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """The signatures by name, for ``tf.saved_model.save``."""
        signatures = {model_signature.SIGNATURE_NAME: self.serve.get_concrete_function()}
        if self.saliency is not None:
            signatures[model_signature.SALIENCY_SIGNATURE_NAME] = (
                self.saliency.get_concrete_function()
            )
        return signatures


def load_exported_weights(model: keras.Model, saved_model_dir: Path) -> None:
    """Load the weights of a SavedModel that :func:`export_saved_model` wrote into ``model``
    (same variant, image size, classes and head): a warm start from a served model.

    The SavedModel's variables are a checkpoint of :class:`ServingModule`, saved under its
    ``features`` (the base), ``hidden`` and ``scores`` (the head) attributes; a module built
    around ``model`` has the same structure, so the checkpoint reads straight into it.
    ValueError when a layer is missing or shaped otherwise (another variant, head or classes).
    """
    module = ServingModule(
        model, ["normal", *(f"c{i}" for i in range(model.output_shape[-1] - 1))], 0.5
    )
    if module.saliency is None:
        raise ValueError("only models with training.model.build_classifier's structure load")
    checkpoint = tf.train.Checkpoint(
        features=module.features, hidden=module.hidden, scores=module.scores
    )
    prefix = Path(saved_model_dir) / "variables" / "variables"
    try:
        checkpoint.read(str(prefix)).assert_existing_objects_matched().expect_partial()
    except (AssertionError, ValueError) as exc:
        raise ValueError(f"{saved_model_dir} does not fit this model: {exc}") from exc
    logger.info("weights loaded from an exported model", extra={"path": str(saved_model_dir)})


def has_saliency_head(model: keras.Model) -> bool:
    """Whether ``model`` has :func:`training.model.build_classifier`'s structure, which the
    forward-only Grad-CAM of :class:`ServingModule` is written for (every model the training
    pipeline builds; hand-made test models may not)."""
    names = {layer.name for layer in model.layers}
    if not {BASE_LAYER, HEAD_DENSE, OUTPUT_LAYER} <= names:
        return False
    base = model.get_layer(BASE_LAYER)
    return isinstance(base, keras.Model) and any(
        layer.name == LAST_CONV_LAYER for layer in base.layers
    )


def check_signatures(saved_model_dir: Path, saliency: bool = True) -> list[str]:
    """The exported signatures against the contract (empty when they hold): ``serving_default``
    always, ``saliency`` when it is expected."""
    problems: list[str] = []
    Specs = tuple[model_signature.TensorSpec, ...]
    expected: list[tuple[str, Specs, Specs]] = [
        (
            model_signature.SIGNATURE_NAME,
            model_signature.OUTPUTS,
            model_signature.OPTIONAL_OUTPUTS,
        )
    ]
    if saliency:
        expected.append(
            (model_signature.SALIENCY_SIGNATURE_NAME, model_signature.SALIENCY_OUTPUTS, ())
        )
    for name, outputs_spec, optional in expected:
        try:
            inputs, outputs = read_signature(saved_model_dir, name)
        except ValueError as error:
            problems.append(str(error))
            continue
        problems += [
            f"{name}: {p}" for p in model_signature.check(inputs, outputs, outputs_spec, optional)
        ]
    return problems


def _check_export_arguments(
    model: keras.Model, class_names: Sequence[str], threshold: float, name: str, temperature: float
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
    if not isinstance(temperature, int | float) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise ValueError(f"model name must be a plain folder name, got {name!r}")


def export_saved_model(
    model: keras.Model,
    class_names: Sequence[str],
    threshold: float,
    repository: Path,
    name: str,
    version: int | None = None,
    *,
    temperature: float = 1.0,
    study_rule: StudyRule | None = None,
) -> Path:
    """Publish ``model`` as ``<repository>/<name>/<version>/`` and return that folder.

    ``temperature`` and ``study_rule`` are what the study evaluation chose
    (:func:`training.study_evaluation.evaluate_study_benchmark`); see :class:`ServingModule`.

        ``version=None`` takes the next integer after the highest existing version folder. The
        SavedModel's ``serving_default`` signature (and ``saliency``, exported for every model with
    :func:`training.model.build_classifier`'s structure) is checked against
        :mod:`schemas.model_signature` before the temporary folder is renamed into place;
        :class:`SignatureMismatch` means nothing was published. An existing version is never
        overwritten (:class:`FileExistsError`).
    """
    _check_export_arguments(model, class_names, threshold, name, temperature)
    module = ServingModule(model, class_names, threshold, temperature, study_rule)
    return _publish(module.signatures(), module, repository, name, version, study_rule is not None)


def _publish(
    signatures: dict[str, tf.types.experimental.ConcreteFunction],
    module: tf.Module,
    repository: Path,
    name: str,
    version: int | None,
    with_study_rule: bool,
) -> Path:
    """Save, check against the contract, and rename into ``<repository>/<name>/<version>``."""
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be a positive integer or None, got {version!r}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    temp = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        # Without the traced gradients of custom-gradient ops (tf.nn.silu, EfficientNet's
        # activation): no signature differentiates (Grad-CAM is forward only), tracing them was
        # 60% of an export, and a loaded model that has them is never freed (the loader
        # registers them globally: +235 MB per load of a 32² B0, which a model server reloading
        # versions leaks).
        tf.saved_model.save(
            module,
            str(temp),
            signatures=signatures,
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )
        problems = check_signatures(
            temp, saliency=model_signature.SALIENCY_SIGNATURE_NAME in signatures
        )
        if with_study_rule and not problems:
            _inputs, outputs = read_signature(temp)
            if model_signature.STUDY_RULE.name not in outputs:
                problems.append(f"{model_signature.STUDY_RULE.name} output missing")
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


class _NewOperatingPoint(tf.Module):
    """A published model with another threshold and study rule: its own graph and weights,
    called unchanged, with those two outputs of ``serving_default`` replaced."""

    def __init__(self, loaded: Any, threshold: float, study_rule: StudyRule) -> None:
        super().__init__(name="scanwatch_operating_point")
        self.loaded = loaded
        self.threshold = tf.constant(threshold, dtype=tf.float32)
        self.study_rule = tf.constant(study_rule.to_json())
        serve = loaded.signatures[model_signature.SIGNATURE_NAME]
        image = serve.structured_input_signature[1][model_signature.INPUT.name]
        spec = [tf.TensorSpec(image.shape, tf.float32, name=model_signature.INPUT.name)]
        self.serve = tf.function(self._serve, input_signature=spec)
        self.saliency: tf.types.experimental.PolymorphicFunction | None = None
        if model_signature.SALIENCY_SIGNATURE_NAME in loaded.signatures:
            self.saliency = tf.function(self._saliency, input_signature=spec)

    def _serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = dict(self.loaded.signatures[model_signature.SIGNATURE_NAME](images=images))
        batch = tf.shape(images)[0]
        outputs["threshold"] = tf.fill([batch], self.threshold)
        outputs[model_signature.STUDY_RULE.name] = tf.fill([batch], self.study_rule)
        return outputs

    def _saliency(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(self.loaded.signatures[model_signature.SALIENCY_SIGNATURE_NAME](images=images))

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        signatures = {model_signature.SIGNATURE_NAME: self.serve.get_concrete_function()}
        if self.saliency is not None:
            signatures[model_signature.SALIENCY_SIGNATURE_NAME] = (
                self.saliency.get_concrete_function()
            )
        return signatures


def export_operating_point(
    source: Path,
    threshold: float,
    study_rule: StudyRule,
    repository: Path,
    name: str,
    version: int | None = None,
) -> Path:
    """Publish the model at ``source`` again, as ``<repository>/<name>/<version>/``, with a new
    threshold and study rule (an operator's own operating point, no retraining): probabilities,
    class names and heatmaps are the source's, computed by its own graph and weights."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    module = _NewOperatingPoint(tf.saved_model.load(str(source)), threshold, study_rule)
    return _publish(module.signatures(), module, repository, name, version, True)
