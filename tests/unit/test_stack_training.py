"""The local stack runs the training worker without importing it (TensorFlow would load into
the supervisor): the consumer group it waits for must be the worker's own."""

from __future__ import annotations

from devtools import stack
from training import worker


def test_the_stack_waits_for_the_training_workers_own_group() -> None:
    assert stack.TRAINING_GROUP == worker.GROUP_ID
