"""The model signature contract: both signatures pinned by a golden file, and its checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from schemas import model_signature
from schemas.model_signature import TensorSpec

GOLDEN = Path(__file__).parent / "golden" / "model_signature.json"


def contract() -> dict[str, object]:
    def specs(tensors: tuple[TensorSpec, ...]) -> list[dict[str, object]]:
        return [dataclasses.asdict(t) | {"shape": list(t.shape)} for t in tensors]

    return {
        model_signature.SIGNATURE_NAME: {
            "inputs": specs((model_signature.INPUT,)),
            "outputs": specs(model_signature.OUTPUTS),
            "optional_outputs": specs(model_signature.OPTIONAL_OUTPUTS),
        },
        model_signature.SALIENCY_SIGNATURE_NAME: {
            "inputs": specs((model_signature.INPUT,)),
            "outputs": specs(model_signature.SALIENCY_OUTPUTS),
        },
    }


def test_the_contract_matches_its_golden_file() -> None:
    """A served model's signatures are an interface to TF Serving clients: changing one is a
    new contract (and a re-export of every model), never an edit of this file."""
    assert contract() == json.loads(GOLDEN.read_text())


def served(size: int = 128, heatmap: tuple[int, ...] = (-1, 128, 128)) -> tuple[dict, dict]:
    inputs = {"images": TensorSpec("images", "float32", (-1, size, size, 3))}
    outputs = {
        "probabilities": TensorSpec("probabilities", "float32", (-1, 4)),
        "class_names": TensorSpec("class_names", "string", (-1, 4)),
        "heatmaps": TensorSpec("heatmaps", "float32", heatmap),
    }
    return inputs, outputs


def test_a_served_saliency_signature_passes() -> None:
    assert model_signature.check_saliency(*served()) == []


@pytest.mark.parametrize(
    ("heatmap", "words"),
    [
        ((-1, 64, 64), "not the input's size"),
        ((-1, 128), "rank 2 != 3"),
    ],
)
def test_heatmaps_off_contract_are_reported(heatmap: tuple[int, ...], words: str) -> None:
    problems = model_signature.check_saliency(*served(heatmap=heatmap))
    assert any(words in p for p in problems), problems


def test_the_serving_default_outputs_are_not_the_saliency_ones() -> None:
    inputs, outputs = served()
    assert any("output names" in p for p in model_signature.check(inputs, outputs))


def serving(size: int = 128) -> tuple[dict, dict]:
    inputs = {"images": TensorSpec("images", "float32", (-1, size, size, 3))}
    outputs = {
        "probabilities": TensorSpec("probabilities", "float32", (-1, 4)),
        "class_names": TensorSpec("class_names", "string", (-1, 4)),
        "threshold": TensorSpec("threshold", "float32", (-1,)),
    }
    return inputs, outputs


def test_the_study_rule_output_is_optional() -> None:
    """Models exported before study rules existed still pass; with one they pass too."""
    inputs, outputs = serving()
    assert model_signature.check_serving(inputs, outputs) == []
    outputs["study_rule"] = TensorSpec("study_rule", "string", (-1,))
    assert model_signature.check_serving(inputs, outputs) == []


def test_a_study_rule_of_the_wrong_type_is_reported() -> None:
    inputs, outputs = serving()
    outputs["study_rule"] = TensorSpec("study_rule", "float32", (-1,))
    problems = model_signature.check_serving(inputs, outputs)
    assert any("study_rule: dtype float32 != string" in p for p in problems), problems


def test_an_unknown_extra_output_is_still_refused() -> None:
    inputs, outputs = serving()
    outputs["surprise"] = TensorSpec("surprise", "float32", (-1,))
    assert any("output names" in p for p in model_signature.check_serving(inputs, outputs))


def test_serving_default_may_return_the_heatmaps_it_scores_with() -> None:
    """One Predict for the score and its evidence: ``heatmaps`` is an optional output of
    ``serving_default``, held to the saliency signature's shape rule."""
    inputs, outputs = serving()
    outputs["heatmaps"] = TensorSpec("heatmaps", "float32", (-1, 128, 128))
    assert model_signature.check_serving(inputs, outputs) == []
    outputs["heatmaps"] = TensorSpec("heatmaps", "float32", (-1, 64, 64))
    problems = model_signature.check_serving(inputs, outputs)
    assert any("not the input's size" in p for p in problems), problems
