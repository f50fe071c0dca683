"""Settings validation and the service's entry point, run as the process a supervisor starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from devtools.kafka_local import free_port
from devtools.peers import echoscu
from devtools.testing import wait_for
from dicom_listener.__main__ import main
from dicom_listener.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_settings_come_from_prefixed_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SCANWATCH_LISTENER_AE_TITLE", " PACS_IN ")
    monkeypatch.setenv("SCANWATCH_LISTENER_PORT", "104")
    monkeypatch.setenv("SCANWATCH_LISTENER_STORAGE_DIR", str(tmp_path))
    monkeypatch.setenv("SCANWATCH_LISTENER_LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.ae_title, settings.port, settings.storage_dir) == ("PACS_IN", 104, tmp_path)
    assert settings.log_level == "DEBUG"
    assert (settings.kafka_bootstrap_servers, settings.metrics_port) == ("127.0.0.1:9092", 9111)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ae_title", "A_TITLE_THAT_IS_TOO_LONG", "1 to 16 characters"),
        ("ae_title", "BACK\\SLASH", "without backslash"),
        ("kafka_bootstrap_servers", "localhost", "host:port"),
        ("log_level", "LOUD", "one of DEBUG, INFO"),
        ("kafka_timeout_s", 0, "greater than 0"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_listener_id_is_stable_per_outbox_and_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker waits on each listener's watermark by this id: a restart must keep it, and
    two listeners (two outboxes) on one host must not share it."""
    monkeypatch.chdir(tmp_path)
    first = Settings(storage_dir=Path("store")).resolved_listener_id
    assert first == Settings(storage_dir=tmp_path / "store").resolved_listener_id
    assert first.startswith(f"{socket.gethostname()[:100]}:") and len(first) <= 128
    assert first != Settings(storage_dir=tmp_path / "other").resolved_listener_id
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 300)
    assert len(Settings(storage_dir=Path("store")).resolved_listener_id) == 128
    monkeypatch.setenv("SCANWATCH_LISTENER_LISTENER_ID", "mr-gateway-1")
    assert Settings().resolved_listener_id == "mr-gateway-1"
    with pytest.raises(ValidationError, match="at most 128 characters"):
        Settings(listener_id="x" * 129)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_reachable_listener_needs_an_allow_list(host: str) -> None:
    with pytest.raises(ValidationError, match="SCANWATCH_LISTENER_ALLOWED_CALLING_AES"):
        Settings(host=host)
    allowed = Settings(host=host, allowed_calling_aes=["MR1@10.1.2.3"])
    assert allowed.allowed_calling_aes == ["MR1@10.1.2.3"]
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert Settings(host=loopback).allowed_calling_aes == []  # development: any caller


def test_main_exits_2_on_invalid_settings_naming_the_setting_not_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A value may be a secret pasted in the wrong variable: the log names the setting and what
    # is wrong, not the value.
    monkeypatch.setenv("SCANWATCH_LISTENER_PORT", "pa55word")
    assert main([]) == 2
    logged = capsys.readouterr().err
    assert "invalid settings" in logged and '"port"' in logged and "valid integer" in logged
    assert "pa55word" not in logged


@pytest.mark.integration
def test_service_answers_echo_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SCANWATCH_LISTENER_PORT": str(port),
        "SCANWATCH_LISTENER_STORAGE_DIR": str(tmp_path / "store"),
        "SCANWATCH_LISTENER_METRICS_PORT": "0",
        "SCANWATCH_LISTENER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_listener"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def answers() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            return echoscu("127.0.0.1", port, "SCANWATCH", timeout=1)

        wait_for(answers, 30, "the listener to answer C-ECHO")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    messages = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    assert "listening" in messages and "stopped" in messages
