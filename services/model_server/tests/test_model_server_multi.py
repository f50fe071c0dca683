"""A model config file with several models, server-side batching and metrics, over real gRPC."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

from devtools.kafka_local import free_port
from scanwatch import tensors
from services.model_server.manager import AVAILABLE

from .test_model_server_grpc import Client, error_of, images

pytestmark = pytest.mark.integration

#: Long enough that a batch which did not fill would make the test visibly wait and fail.
LONG_TIMEOUT_MICROS = 60_000_000
BATCH = 8


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_config_file_serves_several_models_with_policies_labels_and_batching(
    tmp_path: Path,
    published_model: Path,
    serve: Callable[..., Any],
    channel_to: Callable[[str], grpc.Channel],
    wait_for: Callable[..., Any],
) -> None:
    for name, versions in (("brain", (1, 2)), ("skin", (1, 3))):
        for version in versions:
            shutil.copytree(published_model, tmp_path / "repo" / name / str(version))
    config = tmp_path / "models.config"
    config.write_text(
        f"""
        model_config_list {{
          config {{
            name: "brain" base_path: "{tmp_path / "repo" / "brain"}" model_platform: "tensorflow"
            model_version_policy {{ all {{}} }}
            version_labels {{ key: "stable" value: 1 }}
            version_labels {{ key: "canary" value: 2 }}
          }}
          config {{ name: "skin" base_path: "{tmp_path / "repo" / "skin"}" }}
        }}
        """
    )
    metrics_port = free_port()
    server = serve(
        tmp_path,
        model_config_file=config,
        enable_batching=True,
        max_batch_size=BATCH,
        batch_timeout_micros=LONG_TIMEOUT_MICROS,
        metrics_port=metrics_port,
    )
    client = Client(channel_to(server.address))
    wait_for(
        lambda: (
            server.managers["brain"].loaded_versions == [1, 2]
            and server.managers["skin"].loaded_versions == [3]
        ),
        what="brain 1+2 and skin 3 loaded",
    )

    # Policies: brain serves every version, skin only its latest.
    assert {v: s.state for v, s in client.status("brain").items()} == {1: AVAILABLE, 2: AVAILABLE}
    assert {v: s.state for v, s in client.status("skin").items()} == {3: AVAILABLE}
    # Labels resolve per model (GetModelMetadata answers with the resolved version).
    for label, version in (("stable", 1), ("canary", 2)):
        response = client.prediction.GetModelMetadata(_metadata_request("brain", label), timeout=30)
        assert response.model_spec.version.value == version
    assert error_of(lambda: client.predict(images(1), name="absent")).code() == (
        grpc.StatusCode.NOT_FOUND
    )

    # Four concurrent Predicts of 2 images fill one batch of 8: one engine call, split back.
    batches = [images(2, seed=i) for i in range(4)]
    with ThreadPoolExecutor(len(batches)) as pool:
        responses = list(
            pool.map(lambda b: client.predict(b, name="brain", version_label="canary"), batches)
        )
    alone = server.managers["brain"].resolve(_spec("brain", 2)).servable.servable
    for batch, response in zip(batches, responses, strict=True):
        assert response.model_spec.version.value == 2
        got = tensors.to_ndarray(response.outputs["probabilities"])
        expected = alone.run("serving_default", {"images": batch}, ["probabilities"])
        np.testing.assert_allclose(got, expected["probabilities"], rtol=1e-5, atol=1e-6)
    full = client.predict(images(BATCH), name="skin")  # a full batch runs without waiting
    assert full.model_spec.version.value == 3

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    sizes = _samples(text, "scanwatch_model_server_batch_size_count")
    assert sizes == {(("model_name", "brain"),): 1.0, (("model_name", "skin"),): 1.0}
    assert _samples(text, "scanwatch_model_server_batch_size_sum")[
        (("model_name", "brain"),)
    ] == float(BATCH)
    requests = _samples(text, "scanwatch_model_server_requests_total")
    assert requests[(("code", "OK"), ("method", "Predict"), ("model_name", "brain"))] == 4.0
    assert requests[(("code", "NOT_FOUND"), ("method", "Predict"), ("model_name", "<unknown>"))]
    available = _samples(text, "scanwatch_model_server_version_available")
    assert {
        (dict(k)["model_name"], dict(k)["model_version"]) for k, v in available.items() if v
    } == {
        ("brain", "1"),
        ("brain", "2"),
        ("skin", "3"),
    }
    images_total = _samples(text, "scanwatch_model_server_predicted_images_total")
    assert images_total[(("model_name", "brain"), ("model_version", "2"))] == 8.0


def _spec(name: str, version: int) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name)
    spec.version.value = version
    return spec


def _metadata_request(
    name: str, version_label: str
) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = name
    request.model_spec.version_label = version_label
    return request


def test_model_config_file_is_polled_for_changes(
    tmp_path: Path,
    published_model: Path,
    serve: Callable[..., Any],
    channel_to: Callable[[str], grpc.Channel],
    wait_for: Callable[..., Any],
) -> None:
    for name, version in (("brain", 1), ("brain", 2), ("skin", 1)):
        shutil.copytree(published_model, tmp_path / "repo" / name / str(version))
    config = tmp_path / "models.config"

    def write(*entries: str) -> None:
        config.write_text("model_config_list { " + " ".join(entries) + " }")

    brain = f'config {{ name: "brain" base_path: "{tmp_path / "repo" / "brain"}" }}'
    write(brain)
    server = serve(tmp_path, model_config_file=config, model_config_file_poll_wait_seconds=0.1)
    client = Client(channel_to(server.address))
    wait_for(lambda: server.managers["brain"].loaded_versions == [2], what="brain 2 served")

    # A new model, and a policy and labels for the first, without a restart.
    write(
        f'config {{ name: "brain" base_path: "{tmp_path / "repo" / "brain"}" '
        "model_version_policy { all {} } "
        'version_labels { key: "stable" value: 1 } }',
        f'config {{ name: "skin" base_path: "{tmp_path / "repo" / "skin"}" }}',
    )
    wait_for(
        lambda: (
            "skin" in server.managers
            and server.managers["skin"].loaded_versions == [1]
            and server.managers["brain"].loaded_versions == [1, 2]
        ),
        what="skin 1 and brain 1+2 served",
    )
    stable = client.predict(images(1), name="brain", version_label="stable")
    assert stable.model_spec.version.value == 1

    # A broken file is logged and ignored; removing a model unloads it.
    config.write_text("model_config_list { config { name: 'brain' } }")
    write(f'config {{ name: "skin" base_path: "{tmp_path / "repo" / "skin"}" }}')
    wait_for(lambda: "brain" not in server.managers, what="brain removed")
    assert error_of(lambda: client.predict(images(1), name="brain")).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    assert client.predict(images(1), name="skin").model_spec.version.value == 1
