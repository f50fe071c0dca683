"""A circuit breaker for calls to the model server.

After ``failures`` consecutive transient failures the circuit opens: calls fail at once with
:class:`CircuitOpen` (itself transient, so the study is retried or parked) instead of piling
deadlines onto a server that is down. After ``reset_s`` one trial call is let through
(half-open); its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from inference_worker.errors import ModelUnavailable
from inference_worker.metrics import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN


class CircuitOpen(ModelUnavailable):
    """The model server failed repeatedly; calls are refused until the reset time."""


class CircuitBreaker:
    """Counts consecutive failures of one remote service and refuses calls while open."""

    def __init__(
        self,
        failures: int = 5,
        reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[int], None] | None = None,
    ) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._on_state = on_state or (lambda state: None)
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False
        self._set(CIRCUIT_CLOSED)

    def _set(self, state: int) -> None:
        self.state = state
        self._on_state(state)

    def before_call(self) -> None:
        """Raise :class:`CircuitOpen` unless a call may go through now."""
        if self.state == CIRCUIT_OPEN:
            assert self._opened_at is not None
            if self._clock() - self._opened_at < self.reset_s:
                raise CircuitOpen(f"model server circuit open for {self.reset_s:g}s")
            self._set(CIRCUIT_HALF_OPEN)
            self._trial = False
        if self.state == CIRCUIT_HALF_OPEN:
            if self._trial:
                raise CircuitOpen("model server circuit half-open: trial call in flight")
            self._trial = True

    def success(self) -> None:
        self._count = 0
        self._trial = False
        if self.state != CIRCUIT_CLOSED:
            self._set(CIRCUIT_CLOSED)

    def failure(self) -> None:
        self._count += 1
        self._trial = False
        if self.state == CIRCUIT_HALF_OPEN or self._count >= self.failures:
            self._opened_at = self._clock()
            self._set(CIRCUIT_OPEN)
