"""SQL engines for every service that keeps tables (the FHIR store, the OAuth client registry
of ``services.auth``): SQLite and PostgreSQL, tuned as measured in bench/fhir.md.

Concurrency: on SQLite, write transactions start with ``BEGIN IMMEDIATE`` (the database write
lock is taken before the current version is read, and a second writer waits up to the busy
timeout instead of failing); reads stay deferred and, in WAL mode, never wait for writers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlmodel import create_engine

#: Seconds a SQLite writer waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
_WRITE_OPTION = "scanwatch_write"

#: Connections each API process keeps open to PostgreSQL (and as many more while busy).
PG_POOL_SIZE = 10
#: A pooled PostgreSQL connection idle longer than this is pinged before use (see make_engine).
PG_PING_IDLE_S = 5.0


def make_engine(database_url: str, ping_idle_s: float = PG_PING_IDLE_S, **kwargs: Any) -> Engine:
    """An engine for the store; SQLite gets WAL, a busy timeout and immediate write locks;
    PostgreSQL connections idle over ``ping_idle_s`` are checked before use."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # psycopg prepares a statement after its 5th run; PostgreSQL then switches to a generic
        # plan when its estimate looks no worse, which for the date and patient searches it is
        # not (the bounds decide between index walks): planning every run with the actual values
        # more than halved PostgreSQL's CPU per search (bench/fhir.md). Parsing is still saved.
        connect_args = {"options": "-c plan_cache_mode=force_custom_plan"}
        # Connections beyond pool_size are closed when returned; a worker serving more
        # concurrent requests than that opened (and PostgreSQL forked) a connection per
        # request (bench/fhir.md). Ten stay open per process. The most recently returned is
        # used next (LIFO): the few a steady load needs stay warm (their backends' caches and
        # prepared statements) and the rest idle, where a queue would rotate every request
        # through all ten, each backend growing towards every query's caches (the soak saw
        # PostgreSQL's memory creep for half an hour that way).
        pool = {"pool_size": PG_POOL_SIZE, "max_overflow": PG_POOL_SIZE, "pool_use_lifo": True}
        kwargs = pool | kwargs
        engine = create_engine(database_url, connect_args=connect_args, **kwargs)
        _ping_when_idle(engine, ping_idle_s)
        return engine
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        database_url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        **kwargs,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=FULL")  # a 2xx answer means the write is on disk
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection before use only when it sat idle over ``idle_s`` seconds.

    ``pool_pre_ping`` pings on every checkout: a round trip per request, 10 % of the API's CPU
    and a fifth of its searches per second under load (bench/fhir.md). Connections in steady
    use have just proved alive; the ones that sat idle (PostgreSQL restarted, a firewall
    dropped them) are the ones to check. A failed ping makes the pool discard the connection
    and open a new one (SQLAlchemy's "custom pessimistic ping" recipe). A connection that dies
    in the ``idle_s`` after its last use fails its request with 503 (the database error
    handler) and the pool replaces it.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise DisconnectionError(f"idle connection is gone: {error}") from error


def for_writes(engine: Engine) -> Engine:
    """``engine`` for transactions that write: on SQLite they begin IMMEDIATE, so that a read
    followed by a write waits for other writers instead of failing at once ("database is
    locked": a deferred read snapshot cannot be upgraded once another writer committed)."""
    return engine.execution_options(**{_WRITE_OPTION: True})
