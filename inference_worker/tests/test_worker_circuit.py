"""The model server circuit breaker."""

from __future__ import annotations

import pytest

from inference_worker.circuit import CircuitBreaker, CircuitOpen
from inference_worker.metrics import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_recovers_through_half_open():
    clock, states = Clock(), []
    breaker = CircuitBreaker(failures=3, reset_s=10, clock=clock, on_state=states.append)
    for _ in range(2):
        breaker.before_call()
        breaker.failure()
    breaker.before_call()
    breaker.success()  # a success resets the count
    for _ in range(3):
        breaker.before_call()
        breaker.failure()
    assert breaker.state == CIRCUIT_OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now = 10.0
    breaker.before_call()  # the trial call
    assert breaker.state == CIRCUIT_HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one trial at a time
    breaker.success()
    assert breaker.state == CIRCUIT_CLOSED
    assert states == [CIRCUIT_CLOSED, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN, CIRCUIT_CLOSED]


def test_failed_trial_opens_again():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=5, clock=clock)
    breaker.before_call()
    breaker.failure()
    clock.now = 5.0
    breaker.before_call()
    breaker.failure()
    assert breaker.state == CIRCUIT_OPEN
    clock.now = 9.0
    with pytest.raises(CircuitOpen):
        breaker.before_call()
