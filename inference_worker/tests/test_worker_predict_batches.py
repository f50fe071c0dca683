"""A study's Predict batches are all in flight at once (issue 20, point 4: no avoidable round
trips), and still make one result of one model version."""

from __future__ import annotations

import asyncio

import numpy as np

from inference_worker.adapters.tf_serving import ModelClient
from inference_worker.ports import Prediction

CLASSES = ["normal", "mass"]


def test_batches_are_sent_together_and_joined_in_order():
    client = ModelClient("127.0.0.1:1", "brain-mri-anomaly", batch_size=16)
    in_flight, most, sizes = 0, 0, []

    async def batch(images: np.ndarray) -> Prediction:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        sizes.append(len(images))
        await asyncio.sleep(0)  # every batch sent is waiting for its answer here
        in_flight -= 1
        probabilities = np.stack([np.array([1 - x, x], np.float32) for x in images[:, 0, 0, 0]])
        return Prediction(probabilities, CLASSES, 0.5, "brain-mri-anomaly", 1)

    client._predict_batch = batch  # type: ignore[method-assign]
    images = np.zeros((38, 2, 2, 3), np.float32)
    images[:, 0, 0, 0] = np.linspace(0, 1, 38)
    prediction = asyncio.run(client.predict(images))
    assert sizes == [16, 16, 6]
    assert most == 3  # one after the other before: at most 1
    np.testing.assert_array_equal(prediction.probabilities[:, 1], images[:, 0, 0, 0])
