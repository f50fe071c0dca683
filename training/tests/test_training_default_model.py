"""``python -m training.default_model``: publish an untrained version 1 once, then do nothing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import tensorflow as tf

from schemas import model_signature
from training.default_model import CLASS_NAMES, main
from training.repository import published_versions


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    """main() configures the root logger; put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_publishes_version_1_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["--repository", str(tmp_path), "--name", "brain", "--image-size", "32"]
    assert main(args) == 0
    version_1 = tmp_path / "brain" / "1"
    assert published_versions(tmp_path / "brain") == [1]
    modified = (version_1 / "saved_model.pb").stat().st_mtime_ns

    serve = tf.saved_model.load(str(version_1)).signatures[model_signature.SIGNATURE_NAME]
    outputs = serve(images=tf.fill((2, 32, 32, 3), 128.0))
    assert outputs["class_names"].numpy().tolist() == [[c.encode() for c in CLASS_NAMES]] * 2
    assert outputs["threshold"].numpy().tolist() == [0.5, 0.5]
    capfd.readouterr()

    assert main(args) == 0
    assert published_versions(tmp_path / "brain") == [1]
    assert (version_1 / "saved_model.pb").stat().st_mtime_ns == modified
    logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line[:1] == "{"]
    assert "model already has a version; nothing to do" in [entry["msg"] for entry in logged]
