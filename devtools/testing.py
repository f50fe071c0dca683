"""Waiting on conditions, for tests and benchmarks: poll with a deadline, never a bare sleep;
an ASGI app served in a thread until its server has started (:func:`served`); and the records
one logger wrote (:func:`logged`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Call ``condition`` until it returns something truthy and return that; raise
    ``AssertionError`` naming ``what`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def served(app: Any, port: int, timeout: float = 30.0) -> Iterator[int]:
    """Serve an ASGI ``app`` with uvicorn on ``127.0.0.1:port`` (0: a free port) in a thread,
    for as long as the ``with`` lasts; yields the port once the server has started."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited at start-up"
        return server.started

    wait_for(started, timeout, "uvicorn to start", interval=0.02)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)


@contextmanager
def logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records the logger ``name`` (and its children) handles while the ``with`` lasts,
    whatever level it passes. A handler on that logger, not caplog: the root logger's set-up
    varies between test runs (a service's own logging set-up may replace its handlers)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
