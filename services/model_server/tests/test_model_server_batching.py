"""Server-side batching with a fake servable: merging, splitting, padding, limits, errors."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from tensorflow.core.protobuf import meta_graph_pb2

from services.model_server.batching import BatchingServable
from services.model_server.errors import InvalidArgument, Unavailable
from services.model_server.tf_serving_files import BatchingParameters

from .conftest import wait_until

LONG_TIMEOUT_MICROS = 30_000_000  # a batch that waited this long would fail the test's timeout


class DoublingServable:
    """Answers ``doubled`` = 2 × images; records each call's batch; can hold calls at a gate."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return {}

    @property
    def signature_names(self) -> frozenset[str]:
        return frozenset({"serving_default"})

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(30)
        self.calls.append(len(inputs["images"]))
        if self.fail is not None:
            raise self.fail
        every = {"doubled": inputs["images"] * 2, "kind": np.full(len(inputs["images"]), 1.0)}
        return {name: every[name] for name in output_names}


def images(count: int, start: int = 0, width: int = 2) -> dict[str, np.ndarray]:
    values = np.arange(start, start + count, dtype=np.float32)
    return {"images": np.repeat(values[:, None], width, axis=1)}


@pytest.fixture()
def batching() -> Any:
    created: list[BatchingServable] = []

    def make(servable: Any, **params: Any) -> BatchingServable:
        sizes: list[int] = []
        batcher = BatchingServable(servable, BatchingParameters(**params), sizes.append)
        batcher.observed = sizes  # type: ignore[attr-defined]
        created.append(batcher)
        return batcher

    yield make
    for batcher in created:
        batcher.close()


def run_concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=30) for f in [pool.submit(call) for call in calls]]


def test_concurrent_requests_are_merged_into_one_call_and_split_back(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=6, batch_timeout_micros=LONG_TIMEOUT_MICROS)
    # Three requests of 2 images fill the batch: it runs at once, not after the timeout.
    results = run_concurrently(
        [
            lambda s=start: batcher.run("serving_default", images(2, s), ["doubled"])
            for start in (0, 10, 20)
        ]
    )
    assert servable.calls == [6]
    assert batcher.observed == [6]  # type: ignore[attr-defined]
    for start, result in zip((0, 10, 20), results, strict=True):
        assert list(result) == ["doubled"]
        np.testing.assert_array_equal(result["doubled"], images(2, start)["images"] * 2)


def test_requests_queued_behind_a_running_batch_are_merged(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=32, batch_timeout_micros=0)
    servable.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.run, "serving_default", images(1), ["doubled"])
        assert servable.entered.wait(30)  # the engine is busy with the first request
        rest = [
            pool.submit(batcher.run, "serving_default", images(3, 10 * i), ["doubled"])
            for i in (1, 2, 3)
        ]
        servable.gate.set()
        outputs = [first.result(30), *(f.result(30) for f in rest)]
    assert servable.calls == [1, 9]
    np.testing.assert_array_equal(outputs[2]["doubled"], images(3, 20)["images"] * 2)


def test_incompatible_requests_are_not_merged(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=4, batch_timeout_micros=100_000)
    results = run_concurrently(
        [
            lambda: batcher.run("serving_default", images(2), ["doubled"]),
            lambda: batcher.run("serving_default", images(2, width=3), ["doubled"]),
            lambda: batcher.run("serving_default", images(2), ["kind"]),
        ]
    )
    assert sorted(servable.calls) == [2, 2, 2]
    assert results[1]["doubled"].shape == (2, 3)


def test_large_requests_are_split_or_refused(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=4)
    result = batcher.run("serving_default", images(10), ["doubled"])
    assert servable.calls == [4, 4, 2]
    np.testing.assert_array_equal(result["doubled"], images(10)["images"] * 2)

    strict = batching(DoublingServable(), max_batch_size=4, enable_large_batch_splitting=False)
    with pytest.raises(InvalidArgument, match="larger than maximum input batch size 4"):
        strict.run("serving_default", images(5), ["doubled"])


def test_batches_are_padded_to_allowed_sizes(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=8, allowed_batch_sizes=(4, 8))
    result = batcher.run("serving_default", images(3), ["doubled"])
    assert servable.calls == [4]
    assert result["doubled"].shape == (3, 2)
    assert batcher.observed == [4]  # type: ignore[attr-defined]


def test_full_queue_is_unavailable(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=2, max_enqueued_batches=1)
    servable.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(batcher.run, "serving_default", images(2), ["doubled"])
        assert servable.entered.wait(30)  # the batch thread holds the first request
        queued = pool.submit(batcher.run, "serving_default", images(2), ["doubled"])
        wait_until(lambda: batcher.queued_images == 2, what="second request queued")
        with pytest.raises(Unavailable, match="queue .* is full"):
            batcher.run("serving_default", images(1), ["doubled"])
        servable.gate.set()
        assert running.result(30)["doubled"].shape == queued.result(30)["doubled"].shape
    assert servable.calls == [2, 2]


def test_engine_errors_reach_every_request_of_the_batch(batching: Any) -> None:
    servable = DoublingServable()
    servable.fail = InvalidArgument("image too small")
    batcher = batching(servable, max_batch_size=4, batch_timeout_micros=LONG_TIMEOUT_MICROS)

    def call(start: int) -> str:
        try:
            batcher.run("serving_default", images(2, start), ["doubled"])
        except InvalidArgument as error:
            return str(error)
        return "answered"

    assert run_concurrently([lambda: call(0), lambda: call(5)]) == ["image too small"] * 2
    assert servable.calls == [4]


def test_closing_finishes_queued_work_then_refuses(batching: Any) -> None:
    servable = DoublingServable()
    batcher = batching(servable, max_batch_size=4, batch_timeout_micros=LONG_TIMEOUT_MICROS)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(batcher.run, "serving_default", images(1), ["doubled"])
        wait_until(lambda: batcher.queued_images == 1, what="request queued")
        batcher.close()  # runs the waiting batch now instead of after the long timeout
        assert waiting.result(30)["doubled"].shape == (1, 2)
    with pytest.raises(Unavailable):
        batcher.run("serving_default", images(1), ["doubled"])
