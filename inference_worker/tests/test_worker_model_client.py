"""The worker's TF Serving client against the real model server (a separate process)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import get_model_metadata_pb2

from devtools.kafka_local import free_port
from devtools.stack import model_available
from devtools.testing import wait_for
from inference_worker.adapters.tf_serving import ModelClient, SignatureMismatch
from inference_worker.circuit import CircuitBreaker, CircuitOpen

pytestmark = pytest.mark.integration

MODEL = "brain-mri-anomaly"
CLASSES = ("normal", "mass", "bleed", "infarct")
SIZE = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    from training.export import export_saved_model
    from training.model import build_classifier

    repository = tmp_path_factory.mktemp("models")
    model = build_classifier(CLASSES, image_size=SIZE)
    export_saved_model(model, CLASSES, 0.4, repository, MODEL, 1)
    port = free_port()
    env = {
        **os.environ,
        "SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH": str(repository),
        "SCANWATCH_MODEL_SERVER_MODEL_NAME": MODEL,
        "SCANWATCH_MODEL_SERVER_PORT": str(port),
        "SCANWATCH_MODEL_SERVER_METRICS_PORT": "0",
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.model_server"], env=env)
    target = f"127.0.0.1:{port}"
    try:

        def available() -> bool:
            assert proc.poll() is None, "model server exited"
            return model_available(target, MODEL)

        wait_for(available, 120, "the model server to serve the model")
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_predict_in_batches_from_one_version(server):
    batches: list[int] = []
    client = ModelClient(server, MODEL, batch_size=8, on_batch=batches.append)

    async def run():
        size = await client.check_signature()
        images = np.random.default_rng(0).uniform(0, 255, (20, size, size, 3)).astype(np.float32)
        try:
            return size, await client.predict(images)
        finally:
            await client.close()

    size, prediction = asyncio.run(run())
    assert size == SIZE
    assert batches == [8, 8, 4]
    assert prediction.probabilities.shape == (20, len(CLASSES))
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert prediction.class_names == list(CLASSES)
    assert prediction.threshold == pytest.approx(0.4)
    assert (prediction.model_name, prediction.model_version) == (MODEL, 1)


def test_explain_returns_heatmaps_from_the_version_that_scored(server):
    """The saliency signature through the same gRPC API, pinned to the scoring version."""
    client = ModelClient(server, MODEL, batch_size=8)

    async def run():
        size = await client.check_signature()
        images = np.random.default_rng(1).uniform(0, 255, (10, size, size, 3)).astype(np.float32)
        try:
            return await client.predict(images), await client.explain(images, 1)
        finally:
            await client.close()

    prediction, saliency = asyncio.run(run())
    assert client.saliency_ok is True
    assert saliency.heatmaps.shape == (10, SIZE, SIZE)
    assert 0.0 <= saliency.heatmaps.min() and saliency.heatmaps.max() <= 1.0
    np.testing.assert_allclose(saliency.probabilities, prediction.probabilities, atol=1e-6)
    assert saliency.class_names == list(CLASSES)
    assert (saliency.model_name, saliency.model_version) == (MODEL, 1)
    # The model returns the same heatmaps with its score (in two batches of 8 and 2, joined):
    # one pass, and the worker need not ask the saliency signature.
    assert prediction.heatmaps is not None
    np.testing.assert_allclose(prediction.heatmaps, saliency.heatmaps, atol=1e-6)


def test_unknown_label_is_an_error_that_does_not_open_the_circuit(server):
    breaker = CircuitBreaker(failures=1)
    client = ModelClient(server, MODEL, model_label="no-such-label", breaker=breaker)

    async def run():
        try:
            await client.check_signature()
        finally:
            await client.close()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(run())
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    breaker.before_call()  # still closed: a wrong request is not an outage


def test_server_down_opens_the_circuit():
    client = ModelClient(
        f"127.0.0.1:{free_port()}", MODEL, timeout_s=2, breaker=CircuitBreaker(failures=2)
    )
    codes: list[grpc.StatusCode] = []

    async def run():
        try:
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.check_signature()
                codes.append(caught.value.code())
            await client.check_signature()
        finally:
            await client.close()

    with pytest.raises(CircuitOpen):
        asyncio.run(run())
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 2


def test_signature_that_breaks_the_contract_is_refused():
    from tensorflow.core.framework import types_pb2

    signatures = get_model_metadata_pb2.SignatureDefMap()
    sig = signatures.signature_def["serving_default"]
    sig.inputs["images"].dtype = types_pb2.DT_FLOAT
    for dim in (-1, 32, 32, 3):
        sig.inputs["images"].tensor_shape.dim.add(size=dim)
    sig.outputs["scores"].dtype = types_pb2.DT_FLOAT  # not the contract's outputs
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.metadata["signature_def"].Pack(signatures)

    client = ModelClient("unused:1", MODEL)

    async def fake_call(method, request):
        assert method == "GetModelMetadata"
        return response

    client._call = fake_call  # the transport is not under test here
    with pytest.raises(SignatureMismatch, match="output names"):
        asyncio.run(client.check_signature())
