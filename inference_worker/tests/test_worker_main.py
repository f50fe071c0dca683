"""``scanwatch-worker``'s command line: options, and settings refused with a clear message."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import inference_worker.__main__ as cli
from inference_worker.config import Settings


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """main() configures the root logger; give it back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """What ``run`` was called with, instead of starting a worker."""
    calls: list[Settings] = []

    def run(settings: Settings) -> int:
        calls.append(settings)
        return 0

    monkeypatch.setattr(cli, "run", run)
    return calls


def test_options_override_the_environment(ran, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("SCANWATCH_WORKER_WEB_PORT", "7000")
    monkeypatch.setenv("SCANWATCH_WORKER_QUIET_PERIOD_S", "3")
    argv = ["--web-port", "7001", "--web-host", "0.0.0.0", "--data-dir", str(tmp_path / "w")]
    assert cli.main(argv) == 0
    [settings] = ran
    assert (settings.web_port, settings.web_host) == (7001, "0.0.0.0")
    assert settings.data_dir == tmp_path / "w"
    assert settings.quiet_period_s == 3  # what no option names still comes from the environment


def test_without_options_the_environment_decides(ran, monkeypatch):
    monkeypatch.setenv("SCANWATCH_WORKER_WEB_PORT", "7002")
    assert cli.main([]) == 0
    assert ran[0].web_port == 7002
    assert ran[0].model_name == "brain-mri-anomaly"


def test_invalid_settings_are_named_one_per_line_and_exit_2(ran, monkeypatch, capsys):
    monkeypatch.setenv("SCANWATCH_WORKER_QUIET_PERIOD_S", "0")
    monkeypatch.setenv("SCANWATCH_WORKER_ORIENTATION", "oblique")
    assert cli.main(["--web-port", "70000"]) == 2
    assert ran == []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    for name in ("SCANWATCH_WORKER_QUIET_PERIOD_S", "SCANWATCH_WORKER_ORIENTATION", "--web-port"):
        [line] = [line for line in lines if f"{name}:" in line]
        assert '"level": "error"' in line
    assert any("greater than 0" in line for line in lines)
    assert any("axial" in line for line in lines)  # the allowed values are listed


def test_inconsistent_settings_are_reported(ran, monkeypatch, capsys):
    monkeypatch.setenv("SCANWATCH_WORKER_MODEL_VERSION", "2")
    monkeypatch.setenv("SCANWATCH_WORKER_MODEL_LABEL", "stable")
    assert cli.main([]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "set model_version or model_label, not both" in line


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "scanwatch-worker" in out and "--web-port" in out and "SCANWATCH_WORKER_" in out


class FakeWorker:
    """Stands in for ``faust.Worker``: records that it was started."""

    started: list[str] = []

    def __init__(self, app, **kwargs) -> None:
        self.app = app

    def execute_from_commandline(self) -> None:
        FakeWorker.started.append(self.app.conf.id)


def test_the_study_tables_changelog_is_created_before_faust_starts(monkeypatch, tmp_path: Path):
    """Left to Faust, two workers starting together raced to create the changelog, and one
    crashed on the half-created topic (PartitionsMismatch, seen in the broker-leader test)."""
    order: list[object] = []
    monkeypatch.setattr(FakeWorker, "started", order)
    monkeypatch.setattr(cli.faust, "Worker", FakeWorker)
    monkeypatch.setattr(
        cli.kafka, "ensure_topics", lambda servers, topics: order.append((servers, list(topics)))
    )
    settings = Settings(data_dir=tmp_path / "w", kafka_bootstrap_servers="127.0.0.1:9")
    assert cli.run(settings) is None  # Faust's worker exits the process itself
    [(servers, [changelog]), app_id] = order
    assert servers == "127.0.0.1:9" and app_id == settings.app_id
    assert changelog.name == f"{settings.app_id}-study-assembly-changelog"
    assert changelog.compact and changelog.partitions == 4


def test_a_changelog_not_ready_yet_is_retried_before_faust_starts(
    monkeypatch, tmp_path: Path, caplog
):
    """A broker slow to answer (a loaded machine) or restarting: the worker waits for it
    instead of exiting, which failed a development stack's start."""
    started: list[str] = []
    monkeypatch.setattr(FakeWorker, "started", started)
    monkeypatch.setattr(cli.faust, "Worker", FakeWorker)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    failures = [cli.KafkaException("timed out"), cli.KafkaException("timed out")]

    def slow(servers, topics):
        if failures:
            raise failures.pop()

    monkeypatch.setattr(cli.kafka, "ensure_topics", slow)
    with caplog.at_level(logging.WARNING):
        cli.run(Settings(data_dir=tmp_path / "w"))
    assert started and failures == []
    retried = [r for r in caplog.records if r.name == "inference_worker"]
    assert [r.levelname for r in retried] == ["WARNING", "WARNING"]


def test_a_changelog_not_ready_is_an_error_and_faust_is_not_started(
    monkeypatch, tmp_path: Path, caplog
):
    started: list[str] = []
    monkeypatch.setattr(FakeWorker, "started", started)
    monkeypatch.setattr(cli.faust, "Worker", FakeWorker)
    monkeypatch.setattr(cli, "CHANGELOG_WAIT_S", 0.0)  # given up at once

    def refuse(servers, topics):
        raise cli.kafka.KafkaTopicError("topics need 3 brokers")

    monkeypatch.setattr(cli.kafka, "ensure_topics", refuse)
    with caplog.at_level(logging.ERROR):
        assert cli.run(Settings(data_dir=tmp_path / "w")) == 1
    assert started == []
    [record] = [r for r in caplog.records if r.name == "inference_worker"]
    assert "changelog not ready" in record.getMessage()
    assert record.error == "topics need 3 brokers"
