"""Pooled PostgreSQL connections: pinged only after sitting idle, replaced when gone."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from devtools.kafka_local import free_port
from devtools.postgres_local import LocalPostgres
from scanwatch.database import make_engine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalPostgres]:
    # Its own cluster: the test restarts it under the session's other connections otherwise.
    root = Path(tempfile.mkdtemp(prefix="scanwatch-pg-restart-"))
    try:
        cluster = LocalPostgres(root, free_port())
        cluster.start()
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def count_pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    pings: list[object] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_busy_connections_are_not_pinged_and_idle_ones_survive_a_restart(
    cluster: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = make_engine(cluster.database_url(), ping_idle_s=3600.0, pool_size=1)
    idle = make_engine(cluster.database_url(), ping_idle_s=0.0, pool_size=1)
    try:
        busy_pings, idle_pings = count_pings(busy, monkeypatch), count_pings(idle, monkeypatch)
        first = backend_pid(busy)
        assert backend_pid(busy) == first and busy_pings == []  # reused without a round trip

        before = backend_pid(idle)
        cluster.restart()
        # Idle past its limit: the ping finds the connection gone and the pool opens another.
        assert backend_pid(idle) != before
        assert len(idle_pings) == 1
        # Within its limit, nothing is checked: the dead connection fails this request (the
        # API answers 503) and the pool replaces it for the next one.
        with pytest.raises(OperationalError):
            backend_pid(busy)
        assert backend_pid(busy) != first
    finally:
        busy.dispose()
        idle.dispose()


def test_the_connection_returned_last_serves_the_next_request(cluster: LocalPostgres) -> None:
    """LIFO: under a steady load the few connections it needs stay warm and the rest idle,
    instead of every request rotating through the whole pool (each backend then grows towards
    every query's caches)."""
    engine = make_engine(cluster.database_url(), pool_size=3)
    try:
        held = [engine.connect() for _ in range(3)]
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in held]
        for connection in held:  # returned in the order they were taken
            connection.close()
        assert backend_pid(engine) == pids[-1]
        assert backend_pid(engine) == pids[-1]  # and again: the others stay idle
    finally:
        engine.dispose()
