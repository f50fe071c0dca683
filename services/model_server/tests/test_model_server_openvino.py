"""The OpenVINO engine serves the same SavedModel as TensorFlow, with the same outputs.

Inputs are real MR slices (the bundled MNI152 study) preprocessed by the shared
``scanwatch.imaging.preprocess_slice``. The untrained classifier of the other tests answers
~0.25 for every class whatever the image (its BatchNorm statistics are the initial ones), which
would make any comparison pass; so the model here has its BatchNorm statistics calibrated on MR
slices and its output layer scaled, until its probabilities span [0, 1] across slices.

Stated tolerance (also in the README): with f32 inference, every probability within
``PROBABILITY_ATOL`` of TensorFlow's, and the same predicted class wherever TensorFlow's top two
classes are further apart than twice that; class names and threshold identical. The saliency
signature's Grad-CAM heatmaps: every pixel within ``HEATMAP_ATOL`` of TensorFlow's on the slices
whose predicted class is clear (the map explains that class).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest

from scanwatch import tensors
from scanwatch.imaging import preprocess_slice
from scanwatch.sample import build_mr_study
from schemas.model_signature import HEATMAPS, SALIENCY_SIGNATURE_NAME, SIGNATURE_NAME
from services.model_server import openvino_engine
from services.model_server.engine import TensorFlowEngine
from services.model_server.openvino_engine import OpenVINOEngine

from .conftest import CLASS_NAMES, IMAGE_SIZE, MODEL_NAME
from .test_model_server_grpc import Client

pytestmark = pytest.mark.integration

PROBABILITY_ATOL = 1e-3
#: Heatmaps (Grad-CAM in [0, 1], see schemas.model_signature): OpenVINO's within this of
#: TensorFlow's at every pixel, wherever both engines explain the same class.
HEATMAP_ATOL = 1e-2
SALIENCY = SALIENCY_SIGNATURE_NAME
OUTPUTS = ["class_names", "probabilities", "threshold"]
N_SLICES = 16
HEAD_SCALE = 10.0


@pytest.fixture(scope="module")
def mr_slices(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """16 real MR slices as the model sees them (N×32×32×3, float32 in [0, 255])."""
    paths = build_mr_study(tmp_path_factory.mktemp("study"), n_slices=N_SLICES)
    images = []
    for path in paths:
        ds = pydicom.dcmread(path)
        images.append(
            preprocess_slice(
                ds.pixel_array,
                IMAGE_SIZE,
                float(ds.get("RescaleSlope", 1.0)),
                float(ds.get("RescaleIntercept", 0.0)),
            )
        )
    return np.stack(images)


@pytest.fixture(scope="module")
def discriminating_model(tmp_path_factory: pytest.TempPathFactory, mr_slices: np.ndarray) -> Path:
    """An EfficientNetB0 classifier whose outputs depend on the slice, published as version 1."""
    import keras

    from training.export import export_saved_model
    from training.model import build_classifier

    model = build_classifier(CLASS_NAMES, image_size=IMAGE_SIZE, seed=0)
    for layer in model.get_layer("efficientnet").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # one training-mode pass sets the statistics to the slices'
    model(mr_slices, training=True)
    head = model.get_layer("probabilities")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * HEAD_SCALE, bias])
    repository = tmp_path_factory.mktemp("models")
    return export_saved_model(model, CLASS_NAMES, 0.4, repository, MODEL_NAME, version=1)


@pytest.fixture(scope="module")
def openvino_cache(
    tmp_path_factory: pytest.TempPathFactory, discriminating_model: Path
) -> tuple[Path, Any]:
    """The discriminating model loaded once by OpenVINO: (its cache folder, the servable).

    Converting costs ~10 s, so the tests share this one conversion; none of them writes to it.
    """
    cache = tmp_path_factory.mktemp("openvino-cache")
    return cache, OpenVINOEngine(cache).load(discriminating_model)


def _assert_agree(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert actual["probabilities"].dtype == np.float32
    np.testing.assert_allclose(
        actual["probabilities"], expected["probabilities"], rtol=0, atol=PROBABILITY_ATOL
    )
    top2 = np.sort(expected["probabilities"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * PROBABILITY_ATOL
    assert np.array_equal(
        actual["probabilities"][clear].argmax(axis=1),
        expected["probabilities"][clear].argmax(axis=1),
    )
    assert actual["class_names"].tolist() == expected["class_names"].tolist()
    np.testing.assert_array_equal(actual["threshold"], expected["threshold"])


def test_openvino_agrees_with_tensorflow_on_mr_slices(
    discriminating_model: Path, mr_slices: np.ndarray, openvino_cache: tuple[Path, Any]
) -> None:
    tf_outputs = (
        TensorFlowEngine()
        .load(discriminating_model)
        .run(SIGNATURE_NAME, {"images": mr_slices}, OUTPUTS)
    )
    # The comparison means something: the model's answers differ from slice to slice.
    spread = tf_outputs["probabilities"].max(axis=0) - tf_outputs["probabilities"].min(axis=0)
    assert spread.max() > 0.5
    assert len(set(tf_outputs["probabilities"].argmax(axis=1).tolist())) >= 2

    servable = openvino_cache[1]
    assert servable.signature_names == frozenset({SIGNATURE_NAME, SALIENCY})
    ov_outputs = servable.run(SIGNATURE_NAME, {"images": mr_slices}, OUTPUTS)
    assert ov_outputs["class_names"].tolist() == [[n.encode() for n in CLASS_NAMES]] * N_SLICES
    np.testing.assert_array_equal(ov_outputs["threshold"], np.full(N_SLICES, 0.4, np.float32))
    _assert_agree(tf_outputs, ov_outputs)
    # A batch of one, and an output filter without the numeric part, work too.
    one = servable.run(SIGNATURE_NAME, {"images": mr_slices[3:4]}, ["probabilities"])
    np.testing.assert_allclose(
        one["probabilities"], ov_outputs["probabilities"][3:4], rtol=0, atol=PROBABILITY_ATOL
    )
    names = servable.run(SIGNATURE_NAME, {"images": mr_slices[:2]}, ["class_names"])
    assert names["class_names"].shape == (2, len(CLASS_NAMES))


def test_converted_model_is_cached_and_reused(
    discriminating_model: Path,
    openvino_cache: tuple[Path, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache, first = openvino_cache
    entries = list(cache.iterdir())
    assert len(entries) == 2  # one IR per signature: serving_default and saliency
    for entry in entries:
        assert {p.name for p in entry.iterdir()} == {"model.xml", "model.bin"}
    assert not list(discriminating_model.rglob("*.xml"))  # the repository is never written to

    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(openvino_engine.ov, "convert_model", no_conversion)
    second = OpenVINOEngine(cache).load(discriminating_model)
    images = np.random.default_rng(1).uniform(0, 255, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
    inputs = {"images": images.astype(np.float32)}
    np.testing.assert_array_equal(
        first.run(SIGNATURE_NAME, inputs, ["probabilities"])["probabilities"],
        second.run(SIGNATURE_NAME, inputs, ["probabilities"])["probabilities"],
    )


def test_grpc_server_on_openvino_answers_like_tensorflow(
    discriminating_model: Path,
    mr_slices: np.ndarray,
    openvino_cache: tuple[Path, Any],
    serve: Callable[..., Any],
    channel_to: Callable[[str], grpc.Channel],
    wait_for: Callable[..., Any],
) -> None:
    repository = discriminating_model.parent.parent
    servers = {
        engine: serve(repository, engine=engine, openvino_cache_dir=openvino_cache[0])
        for engine in ("tensorflow", "openvino")
    }
    answers = {}
    for engine, server in servers.items():
        assert server.engine.name == engine
        wait_for(lambda s=server: s.manager.loaded_version == 1, what=f"{engine} loaded")
        response = Client(channel_to(server.address)).predict(mr_slices)
        assert response.model_spec.version.value == 1
        answers[engine] = {n: tensors.to_ndarray(p) for n, p in response.outputs.items()}
    _assert_agree(answers["tensorflow"], answers["openvino"])


@pytest.mark.parametrize("signature", [SALIENCY, SIGNATURE_NAME])
def test_openvino_heatmaps_agree_with_tensorflow(
    discriminating_model: Path,
    mr_slices: np.ndarray,
    openvino_cache: tuple[Path, Any],
    signature: str,
) -> None:
    """Grad-CAM is a plain forward graph: OpenVINO converts and runs it, in the saliency
    signature and beside the score in serving_default alike."""
    outputs = ["class_names", HEATMAPS, "probabilities"]
    expected = (
        TensorFlowEngine().load(discriminating_model).run(signature, {"images": mr_slices}, outputs)
    )
    actual = openvino_cache[1].run(signature, {"images": mr_slices}, outputs)
    assert actual[HEATMAPS].shape == (N_SLICES, IMAGE_SIZE, IMAGE_SIZE)
    assert actual["class_names"].tolist() == expected["class_names"].tolist()
    np.testing.assert_allclose(
        actual["probabilities"], expected["probabilities"], rtol=0, atol=PROBABILITY_ATOL
    )
    top2 = np.sort(expected["probabilities"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * PROBABILITY_ATOL
    assert clear.sum() >= N_SLICES // 2
    # The maps mean something: not all zero, and not the same on every slice.
    assert expected[HEATMAPS][clear].max() == pytest.approx(1.0)
    assert np.ptp(expected[HEATMAPS].reshape(N_SLICES, -1).mean(axis=1)) > 0.01
    np.testing.assert_allclose(
        actual[HEATMAPS][clear], expected[HEATMAPS][clear], rtol=0, atol=HEATMAP_ATOL
    )


def test_first_conversion_serves_after_tensorflow_frees_its_variables(
    discriminating_model: Path, mr_slices: np.ndarray, openvino_cache: tuple[Path, Any]
) -> None:
    """A version converted now (``openvino_cache``'s, not read from the IR cache) keeps its own
    copy of the weights.

    ``openvino.convert_model`` shares the TensorFlow variables' buffers by default; the
    SavedModel that owns them is dropped when ``load`` returns, so the compiled model read freed
    memory once TensorFlow reused it: heatmaps of 0 where TensorFlow's were 1, even NaN. Here
    TensorFlow reuses that memory on purpose (tensors of every variable's size, full of NaN)
    before the request.
    """
    import gc

    import tensorflow as tf

    outputs = ["class_names", HEATMAPS, "probabilities"]
    checkpoint = discriminating_model / "variables" / "variables"
    shapes = [shape for _name, shape in tf.train.list_variables(str(checkpoint)) if shape]
    expected = (
        TensorFlowEngine().load(discriminating_model).run(SALIENCY, {"images": mr_slices}, outputs)
    )
    gc.collect()
    churn = [tf.fill(shape, float("nan")) for _ in range(4) for shape in shapes]
    actual = openvino_cache[1].run(SALIENCY, {"images": mr_slices}, outputs)
    del churn
    np.testing.assert_allclose(
        actual["probabilities"], expected["probabilities"], rtol=0, atol=PROBABILITY_ATOL
    )
    np.testing.assert_allclose(actual[HEATMAPS], expected[HEATMAPS], rtol=0, atol=HEATMAP_ATOL)


def test_the_engine_sends_no_telemetry_and_forks_nothing() -> None:
    """OpenVINO's telemetry is off: importing the engine and converting a model send nothing.

    With ``openvino_telemetry`` importable, ``import openvino`` and each ``convert_model`` sent
    a Google Analytics event from a forked process, and the interpreter waited for those at
    exit (the model server outlived SIGTERM). Counted in a fresh interpreter, where the engine
    is the first to import OpenVINO, as in the model server.
    """
    import subprocess
    import sys

    script = """
import os, sys
forks = []
os.register_at_fork(before=lambda: forks.append(1))
import tensorflow as tf
from services.model_server import openvino_engine
spec = tf.TensorSpec([None, 3], tf.float32, name="x")
openvino_engine.ov.convert_model(tf.function(lambda x: x * 2.0).get_concrete_function(spec))
print(len(forks), sys.modules.get("openvino_telemetry") is None)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[3],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        check=True,
    )
    assert result.stdout.split() == ["0", "True"]
