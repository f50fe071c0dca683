"""SavedModel export: the pinned signature, its check, and atomic publishing."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from scanwatch.model_repository import TEMP_PREFIX, published_versions
from scanwatch.saved_model import read_signature, read_signature_defs
from schemas import model_signature
from training.export import SignatureMismatch, export_saved_model
from training.model import build_classifier

pytestmark = pytest.mark.integration

SALIENCY = model_signature.SALIENCY_SIGNATURE_NAME

CLASSES = ("normal", "mass", "bleed", "infarct")
SIZE = 32
NAME = "brain-mri-anomaly"


def small_model(height: int = SIZE, width: int = SIZE, classes: int = len(CLASSES)) -> keras.Model:
    """Exports in a fraction of a second (the EfficientNet export is done once, below)."""
    inputs = keras.Input((height, width, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(pooled))


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    return build_classifier(CLASSES, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def exported(classifier: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("models")
    return export_saved_model(classifier, CLASSES, 0.35, repository, NAME)


def leftovers(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_first_export_is_version_1_in_tf_serving_layout(exported: Path) -> None:
    assert exported.name == "1"
    assert exported.parent.name == NAME
    assert (exported / "saved_model.pb").is_file()
    assert (exported / "variables").is_dir()
    assert published_versions(exported.parent) == [1]
    assert leftovers(exported.parent) == []


def test_exported_signature_passes_the_contract_check(exported: Path) -> None:
    inputs, outputs = read_signature(exported)
    assert model_signature.check_serving(inputs, outputs) == []
    assert outputs[model_signature.HEATMAPS].shape == (-1, SIZE, SIZE)  # the optional output
    assert inputs["images"] == model_signature.TensorSpec("images", "float32", (-1, SIZE, SIZE, 3))
    assert outputs["probabilities"].shape == (-1, len(CLASSES))
    assert outputs["class_names"] == model_signature.TensorSpec(
        "class_names", "string", (-1, len(CLASSES))
    )
    assert outputs["threshold"] == model_signature.TensorSpec("threshold", "float32", (-1,))
    signature = read_signature_defs(exported)[model_signature.SIGNATURE_NAME]
    assert signature.method_name == "tensorflow/serving/predict"


def test_exported_model_computes_what_the_keras_model_computes(
    exported: Path, classifier: keras.Model
) -> None:
    images = np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    serve = tf.saved_model.load(str(exported)).signatures[model_signature.SIGNATURE_NAME]
    outputs = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}

    np.testing.assert_allclose(
        outputs["probabilities"], classifier.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert outputs["class_names"].tolist() == [[c.encode() for c in CLASSES]] * 3
    np.testing.assert_array_equal(outputs["threshold"], np.full(3, 0.35, np.float32))


def test_the_saliency_signature_is_exported_to_its_contract(exported: Path) -> None:
    inputs, outputs = read_signature(exported, SALIENCY)
    assert model_signature.check_saliency(inputs, outputs) == []
    assert outputs[model_signature.HEATMAPS].shape == (-1, SIZE, SIZE)
    signature = read_signature_defs(exported)[model_signature.SALIENCY_SIGNATURE_NAME]
    assert signature.method_name == "tensorflow/serving/predict"  # TF Serving's Predict runs it


def reference_grad_cam(classifier: keras.Model, images: np.ndarray) -> np.ndarray:
    """Grad-CAM the textbook way: autodiff of the predicted class's pre-softmax score with
    respect to the last feature maps (``tf.GradientTape``), weights averaged over the map."""
    base = classifier.get_layer("efficientnet")
    features = keras.Model(base.inputs, base.get_layer("top_activation").output)
    hidden = classifier.get_layer("head_dense")
    output = classifier.get_layer("probabilities")
    x = tf.constant(images)
    maps = features(x, training=False)
    with tf.GradientTape() as tape:
        tape.watch(maps)
        pooled = tf.reduce_mean(maps, axis=[1, 2])
        logits = tf.matmul(hidden(pooled), output.kernel) + output.bias
        predicted = tf.argmax(logits, axis=-1)
        score = tf.reduce_sum(tf.gather(logits, predicted, batch_dims=1))
    alpha = tf.reduce_mean(tape.gradient(score, maps), axis=[1, 2])
    cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", maps, alpha))
    cam = tf.image.resize(cam[..., None], images.shape[1:3])[..., 0].numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)


def test_the_heatmaps_are_grad_cam_of_the_predicted_class(
    exported: Path, classifier: keras.Model
) -> None:
    """The forward-only graph equals autodiff Grad-CAM; probabilities equal serving_default,
    whose own heatmaps (the score and its evidence in one pass) are the saliency signature's."""
    images = np.random.default_rng(3).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    loaded = tf.saved_model.load(str(exported))
    saliency = loaded.signatures[SALIENCY](images=tf.constant(images))
    served = loaded.signatures[model_signature.SIGNATURE_NAME](images=tf.constant(images))

    heatmaps = saliency[model_signature.HEATMAPS].numpy()
    assert heatmaps.shape == (4, SIZE, SIZE)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    np.testing.assert_allclose(heatmaps, reference_grad_cam(classifier, images), atol=1e-4)
    np.testing.assert_allclose(
        saliency["probabilities"].numpy(), served["probabilities"].numpy(), atol=1e-6
    )
    np.testing.assert_allclose(served[model_signature.HEATMAPS].numpy(), heatmaps, atol=1e-6)
    assert saliency["class_names"].numpy().tolist() == [[c.encode() for c in CLASSES]] * 4


def test_a_model_without_the_classifier_head_gets_no_saliency_signature(tmp_path: Path) -> None:
    """Grad-CAM is written for build_classifier's head; another model is still servable."""
    exported = export_saved_model(small_model(), CLASSES, 0.5, tmp_path, NAME)
    assert set(read_signature_defs(exported)) >= {model_signature.SIGNATURE_NAME}
    assert model_signature.SALIENCY_SIGNATURE_NAME not in read_signature_defs(exported)
    _, outputs = read_signature(exported)
    assert model_signature.HEATMAPS not in outputs


def test_a_trained_model_is_exported_without_its_optimizer(tmp_path: Path) -> None:
    model = small_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    images = np.random.default_rng(2).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    model.fit(images, np.arange(8) % len(CLASSES), epochs=1, verbose=0)  # Adam has slots now

    exported = export_saved_model(model, CLASSES, 0.5, tmp_path, NAME)

    saved = [name for name, _ in tf.train.list_variables(str(exported / "variables" / "variables"))]
    assert not [name for name in saved if "optimizer" in name.lower()], saved
    serve = tf.saved_model.load(str(exported)).signatures[model_signature.SIGNATURE_NAME]
    np.testing.assert_allclose(
        serve(images=tf.constant(images))["probabilities"].numpy(),
        model.predict(images, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_versions_count_up_and_are_never_overwritten(tmp_path: Path) -> None:
    model = small_model()
    assert export_saved_model(model, CLASSES, 0.5, tmp_path, NAME).name == "1"
    (tmp_path / NAME / "7").mkdir()  # an incomplete version still takes its number
    assert export_saved_model(model, CLASSES, 0.5, tmp_path, NAME).name == "8"
    with pytest.raises(FileExistsError):
        export_saved_model(model, CLASSES, 0.5, tmp_path, NAME, version=8)
    assert published_versions(tmp_path / NAME) == [1, 8]
    assert leftovers(tmp_path / NAME) == []


def test_signature_off_contract_is_not_published(tmp_path: Path) -> None:
    with pytest.raises(SignatureMismatch, match="square"):
        export_saved_model(small_model(height=SIZE, width=48), CLASSES, 0.5, tmp_path, NAME)
    assert list((tmp_path / NAME).iterdir()) == []  # neither a version nor a temporary folder


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"class_names": ("normal", "mass")}, "does not match 2 class names"),
        ({"class_names": ("benign", "mass", "bleed", "infarct")}, "'normal'"),
        ({"class_names": ("normal", "mass", "mass", "infarct")}, "unique"),
        ({"threshold": 1.5}, "threshold"),
        ({"name": "../elsewhere"}, "plain folder name"),
        ({"version": 0}, "positive integer"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, arguments: dict, words: str) -> None:
    arguments = {"class_names": CLASSES, "threshold": 0.5, "name": NAME, **arguments}
    with pytest.raises(ValueError, match=words):
        export_saved_model(small_model(), repository=tmp_path, **arguments)
    assert not (tmp_path / NAME).exists() or list((tmp_path / NAME).iterdir()) == []
