"""Retrying transient failures (STYLE habit 7) with backoff.

What is transient is the domain's :class:`~inference_worker.errors.TransientError`; the adapters
raise it for their transport's failures, so nothing here knows gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from inference_worker.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


async def with_retries(
    call: Callable[[], Awaitable[T]], retries: int, what: str, base_delay: float = 0.5
) -> T:
    """Await ``call()`` retrying transient failures with exponential backoff, at most ``retries``
    times; the last failure is raised."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == retries or not is_transient(exc):
                raise
            delay = min(base_delay * 2**attempt, 10.0)
            log.warning(
                "transient failure, retrying",
                extra={"what": what, "attempt": attempt + 1, "delay_s": delay, "error": str(exc)},
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def is_transient(exc: BaseException) -> bool:
    """Failures that may go away by themselves: model server or FHIR API down or slow."""
    return isinstance(exc, TransientError)
