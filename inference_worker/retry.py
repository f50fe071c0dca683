"""Classifying failures and retrying the transient ones (STYLE habit 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import httpx

from inference_worker.circuit import CircuitOpen
from inference_worker.model_client import TRANSIENT_CODES

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
    if isinstance(exc, CircuitOpen):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in TRANSIENT_CODES
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return False
