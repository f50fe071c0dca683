"""The model server over real gRPC with TF Serving's own client stubs and a real SavedModel."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from scanwatch import tensors
from scanwatch.model_repository import TEMP_PREFIX
from scanwatch.tensors import signature_specs
from schemas import model_signature
from services.model_server.app import ModelServer, create_server
from services.model_server.config import Settings
from services.model_server.manager import AVAILABLE, END
from training.export import export_saved_model

pytestmark = pytest.mark.integration

MODEL_NAME = "brain-mri-anomaly"
CLASS_NAMES = ("normal", "mass", "bleed", "infarct")
IMAGE_SIZE = 32
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class Client:
    """What a TF Serving client does, through the generated stubs."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def predict(
        self,
        images: np.ndarray | None = None,
        name: str = MODEL_NAME,
        version: int | None = None,
        alias: str = "images",
        **spec: Any,
    ) -> predict_pb2.PredictResponse:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        for key, value in spec.items():
            if key == "output_filter":
                request.output_filter.extend(value)
            else:
                setattr(request.model_spec, key, value)
        if version is not None:
            request.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
        if images is not None:
            request.inputs[alias].CopyFrom(tensors.to_tensor_proto(images))
        return self.prediction.Predict(request, timeout=30)

    def metadata(
        self, name: str = MODEL_NAME, fields: tuple[str, ...] = ("signature_def",)
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
        request.model_spec.name = name
        return self.prediction.GetModelMetadata(request, timeout=30)

    def status(
        self, name: str = MODEL_NAME, version: int | None = None
    ) -> dict[int, get_model_status_pb2.ModelVersionStatus]:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        response = self.models.GetModelStatus(request, timeout=30)
        return {s.version: s for s in response.model_version_status}

    def state(self, version: int) -> int | None:
        try:
            status = self.status().get(version)
        except grpc.RpcError:
            return None
        return None if status is None else status.state


def images(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def error_of(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def server(published_model: Path, wait_for: Callable[..., Any]) -> Iterator[ModelServer]:
    """One server on the session's published model (read-only tests share it)."""
    settings = Settings(
        model_base_path=published_model.parent.parent,
        model_name=MODEL_NAME,
        port=0,
        poll_interval_s=0.1,
        version_labels={"stable": 1, "canary": 2},
        metrics_port=0,
    )
    server = create_server(settings)
    server.start()
    wait_for(lambda: server.manager.loaded_version == 1, what="version 1 loaded")
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def client(server: ModelServer) -> Iterator[Client]:
    with grpc.insecure_channel(server.address) as channel:
        yield Client(channel)


def test_predict_returns_the_models_outputs(client: Client, published_model: Path) -> None:
    batch = images(4)
    response = client.predict(batch)

    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == model_signature.SIGNATURE_NAME
    # TF Serving's default encoding of outputs: typed value fields, not tensor_content.
    assert len(response.outputs["probabilities"].float_val) == 4 * len(CLASS_NAMES)
    outputs = {name: tensors.to_ndarray(proto) for name, proto in response.outputs.items()}
    assert set(outputs) == {"probabilities", "class_names", "threshold", "heatmaps"}
    assert outputs["heatmaps"].shape == (4, IMAGE_SIZE, IMAGE_SIZE)  # the score's evidence
    probabilities = outputs["probabilities"]
    assert probabilities.shape == (4, len(CLASS_NAMES))
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert outputs["class_names"].tolist() == [[n.encode() for n in CLASS_NAMES]] * 4
    np.testing.assert_array_equal(outputs["threshold"], np.full(4, 0.5, np.float32))
    # The same numbers as running the SavedModel directly.
    direct = tf.saved_model.load(str(published_model)).signatures["serving_default"]
    expected = direct(images=tf.constant(batch))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)


def test_output_filter_returns_only_the_asked_outputs(client: Client) -> None:
    response = client.predict(images(2), output_filter=["threshold"])
    assert list(response.outputs) == ["threshold"]


def test_pinned_version_and_labels(client: Client) -> None:
    assert client.predict(images(1), version=1).model_spec.version.value == 1
    assert client.predict(images(1), version_label="stable").model_spec.version.value == 1
    # A version (or a label's version) that is not loaded is NOT_FOUND, an unknown label invalid.
    assert error_of(lambda: client.predict(images(1), version=2)).code() == NOT_FOUND
    assert error_of(lambda: client.predict(images(1), version_label="canary")).code() == NOT_FOUND
    error = error_of(lambda: client.predict(images(1), version_label="nightly"))
    assert error.code() == INVALID_ARGUMENT
    assert "nightly" in error.details()


def test_metadata_signature_matches_the_contract(client: Client) -> None:
    response = client.metadata()

    assert response.model_spec.name == MODEL_NAME
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    signature = signature_map.signature_def[model_signature.SIGNATURE_NAME]
    assert signature.method_name == "tensorflow/serving/predict"
    inputs, outputs = signature_specs(signature)
    assert model_signature.check_serving(inputs, outputs) == []
    assert inputs["images"].shape == (-1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert outputs["probabilities"].shape == (-1, len(CLASS_NAMES))


def test_the_saliency_signature_is_reported_and_served(client: Client) -> None:
    """A second signature of the same SavedModel: GetModelMetadata lists it and Predict runs it
    when ``model_spec.signature_name`` names it, as TF Serving does."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert client.metadata().metadata["signature_def"].Unpack(signature_map)
    saliency = signature_map.signature_def[model_signature.SALIENCY_SIGNATURE_NAME]
    assert model_signature.check_saliency(*signature_specs(saliency)) == []

    batch = images(3, seed=5)
    response = client.predict(batch, signature_name=model_signature.SALIENCY_SIGNATURE_NAME)
    assert response.model_spec.signature_name == model_signature.SALIENCY_SIGNATURE_NAME
    assert sorted(response.outputs) == ["class_names", "heatmaps", "probabilities"]
    heatmaps = tensors.to_ndarray(response.outputs["heatmaps"])
    assert heatmaps.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and heatmaps.dtype == np.float32
    assert 0.0 <= heatmaps.min() and heatmaps.max() <= 1.0
    scored = client.predict(batch)
    np.testing.assert_allclose(
        tensors.to_ndarray(response.outputs["probabilities"]),
        tensors.to_ndarray(scored.outputs["probabilities"]),
        atol=1e-6,
    )
    unknown = error_of(lambda: client.predict(batch, signature_name="gradcam"))
    assert unknown.code() == INVALID_ARGUMENT
    assert 'signature key "gradcam" not found' in (unknown.details() or "")


@pytest.mark.parametrize("fields", [(), ("signature_def", "labels")])
def test_metadata_fields_other_than_signature_def_are_refused(
    client: Client, fields: tuple[str, ...]
) -> None:
    assert error_of(lambda: client.metadata(fields=fields)).code() == INVALID_ARGUMENT


def test_status_reports_the_available_version(client: Client) -> None:
    statuses = client.status()
    assert list(statuses) == [1]
    assert statuses[1].state == AVAILABLE
    assert statuses[1].status.error_code == 0
    assert list(client.status(version=1)) == [1]
    assert error_of(lambda: client.status(version=9)).code() == NOT_FOUND


def test_unknown_model_is_not_found(client: Client) -> None:
    assert error_of(lambda: client.predict(images(1), name="skin-lesions")).code() == NOT_FOUND
    assert error_of(lambda: client.metadata(name="skin-lesions")).code() == NOT_FOUND
    assert error_of(lambda: client.status(name="skin-lesions")).code() == NOT_FOUND


def _malformed_content(client: Client) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    proto = tensors.to_tensor_proto(images(2))
    proto.tensor_content = proto.tensor_content[:-4]  # one float short
    request.inputs["images"].CopyFrom(proto)
    client.prediction.Predict(request, timeout=30)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.predict(images(1), alias="pixels"), "alias not found"),
        (lambda c: c.predict(None), "Missing but required"),
        (lambda c: c.predict(images(1).astype(np.float64)), "dtype"),
        (lambda c: c.predict(np.array([[b"not an image"]], dtype=object)), "dtype"),
        (lambda c: c.predict(images(1)[:, :16]), "shape"),
        (lambda c: c.predict(images(1)[0]), "shape"),
        (lambda c: c.predict(images(1), signature_name="classify"), "signature key"),
        (lambda c: c.predict(images(1), output_filter=["logits"]), "output tensor alias"),
        (_malformed_content, "malformed"),
    ],
    ids=["alias", "missing", "float64", "string", "size", "rank", "signature", "output", "bytes"],
)
def test_bad_requests_are_invalid_argument(
    client: Client, call: Callable[[Client], Any], words: str
) -> None:
    error = error_of(lambda: call(client))
    assert error.code() == INVALID_ARGUMENT
    assert words in error.details()


def test_messages_above_grpc_default_limit_are_accepted(client: Client) -> None:
    # 6 MB, above gRPC's 4 MiB default: it reaches the handler (wrong size → INVALID_ARGUMENT),
    # instead of being cut off by the transport with RESOURCE_EXHAUSTED.
    big = np.zeros((1, 724, 724, 3), np.float32)
    assert error_of(lambda: client.predict(big)).code() == INVALID_ARGUMENT


def test_no_version_yet_is_unavailable(
    tmp_path: Path, serve: Callable[..., ModelServer], channel_to: Callable[[str], grpc.Channel]
) -> None:
    server = serve(tmp_path)
    client = Client(channel_to(server.address))
    assert error_of(lambda: client.predict(images(1))).code() == UNAVAILABLE
    assert error_of(lambda: client.metadata()).code() == UNAVAILABLE
    assert error_of(lambda: client.status()).code() == UNAVAILABLE


def _repository_with_version_1(tmp_path: Path, published_model: Path) -> Path:
    model_dir = tmp_path / MODEL_NAME
    shutil.copytree(published_model, model_dir / "1")
    return model_dir


def test_broken_version_is_skipped_and_reported(
    tmp_path: Path,
    published_model: Path,
    serve: Callable[..., ModelServer],
    channel_to: Callable[[str], grpc.Channel],
    wait_for: Callable[..., Any],
) -> None:
    model_dir = _repository_with_version_1(tmp_path, published_model)
    (model_dir / "5").mkdir()
    (model_dir / "5" / "saved_model.pb").write_bytes(b"not a SavedModel")
    server = serve(tmp_path)
    client = Client(channel_to(server.address))

    wait_for(lambda: client.state(1) == AVAILABLE, what="version 1 served")
    assert client.predict(images(1)).model_spec.version.value == 1
    broken = client.status()[5]
    assert broken.state == END
    assert broken.status.error_code != 0
    assert broken.status.error_message


def small_classifier() -> keras.Model:
    """A model that exports in a fraction of a second: the server does not care what it is."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(pooled)
    return keras.Model(inputs, outputs)


def test_published_version_replaces_the_old_one(
    tmp_path: Path,
    published_model: Path,
    serve: Callable[..., ModelServer],
    channel_to: Callable[[str], grpc.Channel],
    wait_for: Callable[..., Any],
) -> None:
    model_dir = _repository_with_version_1(tmp_path, published_model)
    (model_dir / "9").mkdir()  # incomplete: no saved_model.pb
    shutil.copytree(published_model, model_dir / "latest")  # not an integer
    server = serve(tmp_path)
    client = Client(channel_to(server.address))
    wait_for(lambda: client.state(1) == AVAILABLE, what="version 1 served")

    # Clients keep calling while the new version is published, loaded and switched to.
    stop, seen, failures = threading.Event(), set(), []

    def keep_predicting() -> None:
        while not stop.wait(0.05):  # paced: leave the 2 CPUs to the export and the load
            try:
                seen.add(client.predict(images(1)).model_spec.version.value)
            except grpc.RpcError as error:  # pragma: no cover - asserted empty below
                failures.append(f"{error.code()}: {error.details()}")

    caller = threading.Thread(target=keep_predicting)
    caller.start()
    try:
        export_saved_model(small_classifier(), CLASS_NAMES, 0.7, tmp_path, MODEL_NAME, version=2)
        wait_for(lambda: 2 in seen, what="version 2 answering")
    finally:
        stop.set()
        caller.join()

    assert failures == []
    response = client.predict(images(3))
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose(tensors.to_ndarray(response.outputs["threshold"]), [0.7] * 3)
    wait_for(lambda: client.state(1) == END, what="version 1 unloaded")
    statuses = client.status()
    assert sorted(statuses) == [1, 2]  # the incomplete and non-integer folders were ignored
    assert statuses[2].state == AVAILABLE
    assert error_of(lambda: client.predict(images(1), version=1)).code() == NOT_FOUND
    assert not [p for p in model_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]
