"""Fixtures of the model server tests: one small published model, servers on free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from devtools.testing import wait_for

MODEL_NAME = "brain-mri-anomaly"
CLASS_NAMES = ("normal", "mass", "bleed", "infarct")
IMAGE_SIZE = 32  # EfficientNet's smallest input: the tests exercise serving, not accuracy


def wait_until(
    condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    return wait_for(condition, timeout_s, what)


@pytest.fixture(scope="session", name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    return wait_until


@pytest.fixture(scope="session")
def classifier() -> Any:
    """An untrained EfficientNetB0 classifier at 32² (built once: construction takes seconds)."""
    from training.model import build_classifier

    return build_classifier(CLASS_NAMES, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="session")
def published_model(tmp_path_factory: pytest.TempPathFactory, classifier: Any) -> Path:
    """Version 1 of ``classifier`` (threshold 0.5) in a repository; returns the version folder.

    Exported once per session; tests that change a repository copy this folder into their own.
    """
    from training.export import export_saved_model

    repository = tmp_path_factory.mktemp("models")
    return export_saved_model(classifier, CLASS_NAMES, 0.5, repository, MODEL_NAME, version=1)


@pytest.fixture()
def serve() -> Iterator[Callable[..., Any]]:
    """Start model servers in-process on free ports; every one is stopped after the test."""
    from services.model_server.app import ModelServer, create_server
    from services.model_server.config import Settings

    servers: list[ModelServer] = []

    def start(repository: Path, instance: Any = None, **settings: Any) -> ModelServer:
        """A server on ``repository``; ``instance`` is an engine object (default: settings')."""
        single = ({} if "model_config_file" in settings else {"model_base_path": repository}) | (
            {} if "model_config_file" in settings else {"model_name": MODEL_NAME}
        )
        config = Settings(port=0, poll_interval_s=0.1, **{"metrics_port": 0, **single, **settings})
        server = create_server(config, instance)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=1.0)


@pytest.fixture()
def channel_to() -> Iterator[Callable[[str], grpc.Channel]]:
    """Open insecure channels (closed after the test)."""
    channels: list[grpc.Channel] = []

    def open_channel(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()
