"""The pipeline page's model status: GetModelStatus over gRPC, as an operator asks TF Serving,
here answered by a real scanwatch model server serving the shipped model; decoded with the
console's own message declarations and checked field by field against TF Serving's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.kafka_local import free_port
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from services.console.model_status import model_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from services.model_server.app import create_server
    from services.model_server.config import Settings
    from training.default_model import publish_shipped

    repository = tmp_path_factory.mktemp("models")
    publish_shipped(repository, DEFAULT_MODEL_NAME)
    server = create_server(
        Settings(
            port=0,
            metrics_port=0,
            model_base_path=repository,
            model_name=DEFAULT_MODEL_NAME,
            poll_interval_s=0.1,
        )
    )
    server.start()
    try:
        yield server.address
    finally:
        server.stop(grace_s=1.0)


def test_the_served_version_and_its_state(served: str) -> None:
    from devtools.testing import wait_for

    status = wait_for(
        lambda: (s := model_status(served, DEFAULT_MODEL_NAME)).serving and s, 60, "AVAILABLE"
    )
    assert status.problem is None
    assert [(v.version, v.state, v.error) for v in status.versions] == [(1, "AVAILABLE", None)]
    assert status.serving == 1


def test_the_same_answer_as_tf_servings_own_messages(served: str) -> None:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    with grpc.insecure_channel(served) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = DEFAULT_MODEL_NAME
        official = stub.GetModelStatus(request, timeout=10)
    ours = model_status(served, DEFAULT_MODEL_NAME)
    assert [(v.version, v.state) for v in ours.versions] == [
        (v.version, get_model_status_pb2.ModelVersionStatus.State.Name(v.state))
        for v in official.model_version_status
    ]


def test_an_unknown_model_and_a_server_that_is_down(served: str) -> None:
    unknown = model_status(served, "no-such-model")
    assert unknown.versions == () and unknown.problem is not None
    assert unknown.problem.startswith("NOT_FOUND")
    down = model_status(f"127.0.0.1:{free_port()}", DEFAULT_MODEL_NAME, timeout=1)
    assert down.problem is not None and down.problem.startswith(("UNAVAILABLE", "DEADLINE"))
    assert down.serving is None
