"""The trained model, judged by Rasa's own tools on data it never saw: ``rasa data validate``,
``rasa test nlu`` on the held-out utterances (tests/nlu_heldout.yml: written apart from
data/nlu.yml, with typos, very short and long messages, non-native English) against the bar,
and ``rasa test`` on the end-to-end test stories (tests/test_stories.yml).

The reports are kept in ``<var>/chatbot/reports/`` (intent_report.json, the confusion matrix,
failed stories). ``bench/chatbot.py`` prints the per-intent table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train import PROJECT

VAR = Path(os.environ.get("SCANWATCH_VAR", PROJECT.parent / "var"))
MODELS = VAR / "chatbot" / "models"
REPORTS = VAR / "chatbot" / "reports"
#: The bar of issue 15: intent macro-F1 on held-out utterances.
MACRO_F1_BAR = 0.95
HELD_OUT = PROJECT / "tests" / "nlu_heldout.yml"
RASA = str(Path(sys.executable).with_name("rasa"))


def rasa(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RASA_TELEMETRY_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [RASA, *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def model() -> Path:
    models = sorted(MODELS.glob("patient-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not models:
        pytest.fail(f"no trained model in {MODELS}: scripts/bootstrap.sh trains it")
    return models[-1]


def test_the_training_data_validates_without_warnings() -> None:
    done = rasa("data", "validate", "--fail-on-warnings")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_held_out_set_is_large_enough_and_apart_from_training() -> None:
    """At least 15 utterances per intent, none of them in the training data."""
    from rasa.shared.nlu.training_data.loading import load_data

    held_out = load_data(str(HELD_OUT))
    training = load_data(str(PROJECT / "data" / "nlu.yml"))
    seen = {m.get("text").strip().lower() for m in training.intent_examples}
    counts = {intent: 0 for intent in training.intents}
    for message in held_out.intent_examples:
        counts[message.get("intent")] += 1
        assert message.get("text").strip().lower() not in seen, message.get("text")
    assert min(counts.values()) >= 15, counts


@pytest.fixture(scope="module")
def evaluation(model: Path) -> Path:
    """One ``rasa test`` run (one model load): the test stories, then the held-out NLU set."""
    out = REPORTS
    done = rasa(
        "test",
        "--stories",
        str(PROJECT / "tests" / "test_stories.yml"),
        "--nlu",
        str(HELD_OUT),
        "--model",
        str(model),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_intent_macro_f1_on_held_out_utterances_meets_the_bar(evaluation: Path) -> None:
    report = json.loads((evaluation / "intent_report.json").read_text())
    worst = sorted(
        (v["f1-score"], k) for k, v in report.items() if isinstance(v, dict) and "support" in v
    )[:5]
    assert report["macro avg"]["f1-score"] >= MACRO_F1_BAR, worst


def test_end_to_end_stories(evaluation: Path) -> None:
    """Every test story's intents (through NLU) and actions are predicted as written."""
    failed = (evaluation / "failed_test_stories.yml").read_text()
    assert "None of the test stories failed" in failed, failed
    assert (evaluation / "story_report.json").exists()
