"""The console entry point: settings from the environment, serving until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from devtools.kafka_local import free_port
from services.model_server.config import Settings
from services.model_server.manager import AVAILABLE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH", "/srv/models")
    monkeypatch.setenv("SCANWATCH_MODEL_SERVER_PORT", "9500")
    monkeypatch.setenv("SCANWATCH_MODEL_SERVER_VERSION_LABELS", '{"stable": 3}')
    monkeypatch.setenv("SCANWATCH_MODEL_SERVER_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.model_dir == Path("/srv/models/brain-mri-anomaly")
    assert (settings.port, settings.version_labels, settings.log_level) == (
        9500,
        {"stable": 3},
        "DEBUG",
    )
    assert settings.max_message_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("model_name", "../escape", "plain folder name"),
        ("log_level", "LOUD", "DEBUG, INFO"),
        ("port", 70000, "less than or equal"),
        ("poll_interval_s", 0, "greater than"),
    ],
)
def test_bad_settings_are_refused(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(**{field: value})


def _run(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.model_server", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_bad_settings_exit_with_status_2() -> None:
    process = _run(["--port", "70000"], {})
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "invalid settings" in stderr


def test_serves_until_sigterm(published_model: Path, wait_for: Callable[..., Any]) -> None:
    port = free_port()
    env = {
        "SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH": str(published_model.parent.parent),
        "SCANWATCH_MODEL_SERVER_MODEL_NAME": published_model.parent.name,
        "SCANWATCH_MODEL_SERVER_POLL_INTERVAL_S": "0.2",
        "SCANWATCH_MODEL_SERVER_METRICS_PORT": str(free_port()),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    process = _run(["--port", str(port)], env)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = published_model.parent.name

    def available() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            response = stub.GetModelStatus(request, timeout=2)
        except grpc.RpcError:
            return False
        return [(s.version, s.state) for s in response.model_version_status] == [(1, AVAILABLE)]

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            wait_for(available, timeout_s=120, what="version 1 available")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    messages = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    assert "serving model version" in messages
    assert messages[-1] == "model server stopped"
