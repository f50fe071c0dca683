"""A model trained with context from neighbouring slices (issue 18, 2.5D) is sent each scored
slice with its neighbours; a model without it gets what it always got. Real DICOM files, a
fake model, a fake FHIR writer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference_worker.errors import ModelUnavailable
from inference_worker.ports import Prediction
from inference_worker.scoring import Scorer
from inference_worker.series import (
    SelectionRules,
    choose_series,
    context_plan,
    path_of,
    select_series,
)
from inference_worker.tests.test_worker_scoring import CLASSES, ListWriter, refs_for
from scanwatch.imaging import NEIGHBOURS, NO_CONTEXT
from scanwatch.sample import build_mr_study
from scanwatch.study_score import StudyRule
from schemas import StudyReadyV1

SIZE = 32


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return build_mr_study(tmp_path_factory.mktemp("mr"), patient_id="P-CTX", n_slices=10)


def ready_for(files: list[Path]) -> StudyReadyV1:
    refs = refs_for(files)
    return StudyReadyV1(
        StudyInstanceUID=pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID,
        instances=refs,
        first_received_at="2026-01-01T00:00:00Z",
        last_received_at="2026-01-01T00:00:01Z",
        quiet_period_s=1,
    )


class ContextModel:
    """Answers with a study rule of ``contexts[i]`` on its i-th Predict (the last one after);
    ``input_context``: what the worker believes before asking (None: the attribute is absent,
    as on a model port written before contexts)."""

    image_size = SIZE

    def __init__(self, contexts: list[str], input_context: str | None = None) -> None:
        self.contexts = contexts
        self.seen: list[np.ndarray] = []
        if input_context is not None:
            self.input_context = input_context

    async def check_signature(self) -> int:
        return SIZE

    async def predict(self, images: np.ndarray) -> Prediction:
        self.seen.append(images)
        context = self.contexts[min(len(self.seen), len(self.contexts)) - 1]
        n = len(images)
        probabilities = np.tile(np.array([0.7, 0.1, 0.1, 0.1], np.float32), (n, 1))
        rule = StudyRule("max", context=context)
        return Prediction(probabilities, CLASSES, 0.5, "fake-model", 4, study_rule=rule)


def score(model, files: list[Path], rules: SelectionRules | None = None) -> ListWriter:
    writer = ListWriter()
    scorer = Scorer(model, writer, retries=0, rules=rules, heatmaps=False)
    asyncio.run(scorer.score(ready_for(files)))
    return writer


def test_a_model_without_context_gets_the_repeated_slice_as_ever(study):
    model = ContextModel([NO_CONTEXT])  # no input_context attribute at all
    score(model, study)
    (images,) = model.seen  # asked once
    assert images.shape == (10, SIZE, SIZE, 3)
    assert images.strides[-1] == 0  # the view that repeats one grey array: no copy
    np.testing.assert_array_equal(images, select_series(refs_for(study), SIZE).images)


def test_a_neighbours_model_is_asked_again_with_neighbours_once_known(study):
    model = ContextModel([NEIGHBOURS], input_context=NO_CONTEXT)
    writer = score(model, study)
    first, second = model.seen
    assert first.strides[-1] == 0  # sent as for a model without context, then told otherwise
    expected = select_series(refs_for(study), SIZE, context=NEIGHBOURS).images
    np.testing.assert_array_equal(second, expected)
    # channel 0 of slice 4 is slice 3 itself (the one scored fourth, in order along the normal)
    np.testing.assert_array_equal(second[4, ..., 0], second[3, ..., 1])
    np.testing.assert_array_equal(second[4, ..., 2], second[5, ..., 1])
    assert writer.resources  # the study was scored and written


def test_a_known_neighbours_model_is_asked_once(study):
    model = ContextModel([NEIGHBOURS], input_context=NEIGHBOURS)
    score(model, study)
    (images,) = model.seen
    np.testing.assert_array_equal(
        images, select_series(refs_for(study), SIZE, context=NEIGHBOURS).images
    )


def test_with_a_gap_rule_the_neighbours_of_scored_slices_are_decoded_too(study):
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in study]
    z = sorted(float(d.ImagePositionPatient[2]) for d in datasets)
    thickness = float(datasets[0].SliceThickness)
    rules = SelectionRules(max_gap_mm=2 * (z[1] - z[0]) - thickness)  # every other slice
    chosen = choose_series(refs_for(study), rules)
    assert 3 <= len(chosen.frames) < 10
    plan = context_plan(chosen)
    assert len(plan.frames) > len(chosen.frames)  # unscored neighbours decoded as context
    model = ContextModel([NEIGHBOURS], input_context=NEIGHBOURS)
    score(model, study, rules)
    (images,) = model.seen
    assert len(images) == len(chosen.frames)
    # Against the whole series decoded without context: the scored slice at series index j
    # has slices j - 1, j, j + 1 of the series (clamped), scored or not.
    whole = select_series(refs_for(study), SIZE).images
    for k, frame in enumerate(chosen.frames):
        j = z.index(frame.position)
        np.testing.assert_array_equal(images[k, ..., 0], whole[max(j - 1, 0), ..., 0])
        np.testing.assert_array_equal(images[k, ..., 1], whole[j, ..., 0])
        np.testing.assert_array_equal(images[k, ..., 2], whole[min(j + 1, 9), ..., 0])


def test_a_model_whose_context_keeps_changing_is_unavailable_for_now(study):
    model = ContextModel([NEIGHBOURS, NO_CONTEXT], input_context=NO_CONTEXT)
    with pytest.raises(ModelUnavailable, match="input context kept changing"):
        score(model, study)
    assert len(model.seen) == 2


def test_the_plan_of_a_whole_series_is_every_slice_once(study):
    chosen = choose_series(refs_for(study))
    plan = context_plan(chosen)
    assert plan.frames == chosen.frames
    assert plan.rows == tuple(range(10))
    assert plan.below == (0, *range(9)) and plan.above == (*range(1, 10), 9)


def test_a_series_whose_rows_and_columns_run_the_other_way_is_ordered_foot_to_head(tmp_path):
    """Training gives a slice the one below it (towards the feet) as its first channel. A
    scanner whose ImageOrientationPatient's column direction is flipped has a slice normal
    pointing to the feet: ordered along that normal, "below" became "above" for every slice
    and the model was sent its channels swapped."""
    files = build_mr_study(tmp_path, patient_id="P-FLIP", n_slices=6)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "-1", "0"]  # normal (0, 0, -1)
        ds.save_as(path)
    plan = context_plan(choose_series(refs_for(files)))
    heights = [
        float(pydicom.dcmread(path_of(f.ref.storage_uri)).ImagePositionPatient[2])
        for f in plan.frames
    ]
    assert heights == sorted(heights) and len(set(heights)) == 6
