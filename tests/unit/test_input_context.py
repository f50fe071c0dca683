"""Context from neighbouring slices (issue 18, 2.5D): the channel layout every builder shares
(scanwatch.imaging.neighbour_channels) and how a model says which inputs it wants (its study
rule's ``context``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scanwatch.imaging import (
    INPUT_CONTEXTS,
    NEIGHBOURS,
    NO_CONTEXT,
    adjacent_rows,
    neighbour_channels,
)
from scanwatch.study_score import LEGACY_RULE, Calibration, StudyRule


def constant_stack(n: int, side: int = 4) -> np.ndarray:
    """``n`` slices, slice ``i`` all ``10 * (i + 1)``: every value names its slice."""
    return np.stack([np.full((side, side), 10.0 * (i + 1), np.float32) for i in range(n)])


def test_channels_are_below_self_above_with_the_ends_clamped() -> None:
    grey = constant_stack(5)
    below, above = adjacent_rows(5)
    out = neighbour_channels(grey, np.arange(5), below, above)
    assert out.shape == (5, 4, 4, 3) and out.dtype == np.float32
    # slice 0 has no slice below: itself; slice 4 has none above: itself
    expected = [(10, 10, 20), (10, 20, 30), (20, 30, 40), (30, 40, 50), (40, 50, 50)]
    assert [tuple(out[i, 0, 0]) for i in range(5)] == expected
    for i in range(5):  # constant within each channel
        assert (out[i] == out[i, 0, 0]).all()


def test_channels_of_a_subset_and_of_a_grey_channel_axis() -> None:
    grey = constant_stack(6)[..., None]  # (n, S, S, 1), as the study benchmark stores it
    out = neighbour_channels(grey, [1, 4], [0, 3], [2, 5])
    assert [tuple(out[i, 2, 2]) for i in range(2)] == [(10, 20, 30), (40, 50, 60)]


def test_a_single_slice_is_its_own_neighbours() -> None:
    below, above = adjacent_rows(1)
    out = neighbour_channels(constant_stack(1), [0], below, above)
    assert tuple(out[0, 0, 0]) == (10, 10, 10)


def test_anything_but_grey_slices_is_refused() -> None:
    with pytest.raises(ValueError, match="grey slices"):
        neighbour_channels(np.zeros((3, 4, 4, 3), np.float32), [0], [0], [1])


def test_a_rule_without_context_exports_the_json_it_did_before() -> None:
    rule = StudyRule("top_k_mean", 3, Calibration(1.5, -0.25), "sensitivity >= 0.95")
    # the row a model exported before the field existed, byte for byte
    before = (
        '{"aggregation":"top_k_mean","calibration":{"intercept":-0.25,"slope":1.5},'
        '"k":3,"operating_point":"sensitivity >= 0.95"}'
    )
    assert rule.context == NO_CONTEXT
    assert rule.to_json() == before
    assert StudyRule.from_json(before) == rule
    assert LEGACY_RULE.context == NO_CONTEXT


def test_a_neighbours_rule_round_trips_through_its_json() -> None:
    rule = StudyRule("max", context=NEIGHBOURS, operating_point="x")
    text = rule.to_json()
    assert json.loads(text)["context"] == NEIGHBOURS
    assert StudyRule.from_json(text) == rule
    assert StudyRule.from_json(text.encode()).context == NEIGHBOURS


@pytest.mark.parametrize("context", ["2.5d", "", "Neighbours"])
def test_an_unknown_context_is_refused_by_name(context: str) -> None:
    with pytest.raises(ValueError, match="context must be one of none, neighbours"):
        StudyRule(context=context)
    with pytest.raises(ValueError, match="context"):
        StudyRule.from_json(json.dumps({"aggregation": "max", "context": context}))
    assert context not in INPUT_CONTEXTS
