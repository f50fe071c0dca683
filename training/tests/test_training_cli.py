"""``python -m training``: the tiny configuration end to end, then the model commands.

This is CI's training run: the tiny benchmark (64², a few subjects), two epochs with the
fine-tuning switch after the first, evaluation report, export, registry, promotion; then
``models list|promote|rollback`` and ``evaluate`` on what it published.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest

from scanwatch.model_registry import CANDIDATE, ROLLED_BACK, SERVING, Registry
from training.cli import main
from training.evaluate import CONFUSION_PNG, CURVES_PNG, REPORT_JSON, REPORT_MARKDOWN, ROC_PNG
from training.export import export_saved_model

pytestmark = pytest.mark.integration

NAME = "brain-mri-anomaly"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCANWATCH_TRAIN_CACHE_DIR", str(root / "cache"))
    mp.delenv("SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    try:
        code = main(
            [
                "train",
                "--preset",
                "tiny",
                "--epochs",
                "2",
                "--fine-tune-after",
                "1",
                "--batch-size",
                "16",
                "--repository",
                str(root / "models"),
                "--run-dir",
                str(root / "run"),
            ]
        )
    finally:
        mp.undo()
    assert code == 0
    return root


def test_tiny_training_publishes_a_served_version_with_its_report(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(trained / "models")
    assert registry.served_versions(NAME) == [1]
    record = registry.get(NAME, 1)
    assert record.status == SERVING and record.class_names == ["normal", "mass", "bleed", "infarct"]
    assert 0.0 <= record.macro_f1 <= 1.0 and len(record.dataset_fingerprint) == 64
    report_dir = trained / "run" / "evaluation"
    for name in (REPORT_JSON, REPORT_MARKDOWN, CURVES_PNG, CONFUSION_PNG, ROC_PNG):
        assert (report_dir / name).is_file(), name
    report = json.loads((report_dir / REPORT_JSON).read_text())
    assert report["macro_f1"] == pytest.approx(record.macro_f1)
    assert sum(row["support"] for row in report["per_class"].values()) == report["images"] == 16
    history = json.loads((trained / "run" / "state.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["initial", "fine-tune"]


def test_models_list_promote_rollback_evaluate(
    trained: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCANWATCH_TRAIN_CACHE_DIR", str(trained / "cache"))
    monkeypatch.delenv("SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    repository = ["--repository", str(trained / "models")]
    registry = Registry(trained / "models")
    # A second candidate (a trivial model): worse, so only a forced promotion serves it.
    version = registry.reserve(NAME)
    inputs = keras.Input((64, 64, 3), name="images")
    model = keras.Model(
        inputs,
        keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)),
    )
    export_saved_model(
        model,
        ["normal", "mass", "bleed", "infarct"],
        0.5,
        trained / "models" / ".staging",
        NAME,
        version=version,
    )
    registry.record_candidate(
        NAME,
        version,
        dataset_fingerprint="d" * 64,
        metrics={"macro_f1": -0.0},
        class_names=["normal", "mass", "bleed", "infarct"],
        threshold=0.5,
    )
    capsys.readouterr()

    assert main(["models", "list", "--json", *repository]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["status"]) for r in listed] == [(1, SERVING), (2, CANDIDATE)]

    if registry.get(NAME, 1).macro_f1 > 0:
        assert main(["models", "promote", "2", *repository]) == 1
        assert "not promoted" in capsys.readouterr().err
        assert registry.served_versions(NAME) == [1]
    assert main(["models", "promote", "2", "--force", *repository]) == 0
    assert registry.served_versions(NAME) == [1, 2]

    assert main(["models", "rollback", *repository]) == 0
    assert "version 2 withdrawn, version 1 served" in capsys.readouterr().out
    assert registry.served_versions(NAME) == [1]
    assert registry.get(NAME, 2).status == ROLLED_BACK

    out = trained / "evaluate"
    assert main(["evaluate", "--preset", "tiny", "--out", str(out), *repository]) == 0
    page = capsys.readouterr().out
    assert f"{NAME} version 1" in page and "| **macro avg** |" in page
    evaluated = json.loads((out / REPORT_JSON).read_text())
    assert evaluated["macro_f1"] == pytest.approx(registry.get(NAME, 1).macro_f1, abs=1e-6)


def test_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "rollback", "--repository", str(tmp_path)]) == 1
    assert "no served version" in capsys.readouterr().err
    assert main(["train", "--dataset", "folder", "--repository", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "nonsense"])
