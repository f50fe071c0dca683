"""Several API processes over one PostgreSQL store: the database is prepared once, before the
workers start, and exactly one process sends subscription notifications, whichever process
took the write (the outbox in ``resource_change`` + the notifier lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from devtools.kafka_local import free_port
from devtools.postgres_local import LocalPostgres
from devtools.testing import wait_for
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.models import ResourceChange
from services.fhir_api.tests.test_search import HEADERS, scored, write
from services.fhir_api.tests.test_subscriptions import (  # noqa: F401 - the receiver fixture
    Receiver,
    receiver,
    subscription,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0
ROOT = Path(__file__).resolve().parents[3]


def pg_settings(database_url: str, **changes: object) -> Settings:
    return Settings(
        database_url=database_url,
        auth_mode="off",
        subscription_backoff_s=0.05,
        subscription_max_attempts=3,
        subscription_poll_s=0.05,
        **changes,  # type: ignore[arg-type]
    )


def pending_changes(client: TestClient) -> int:
    with client.app.state.store.reading() as connection:  # type: ignore[attr-defined]
        return connection.execute(select(func.count()).select_from(ResourceChange)).scalar_one()


def notifier(client: TestClient) -> bool:
    return client.app.state.subscriptions.is_notifier  # type: ignore[attr-defined]


def test_one_notifier_delivers_every_change_once(
    postgres: LocalPostgres,
    receiver: Receiver,  # noqa: F811
) -> None:
    settings = pg_settings(postgres.database_url())
    with ExitStack() as stack:
        apps = [stack.enter_context(TestClient(create_app(settings))) for _ in range(2)]
        assert sorted(notifier(app) for app in apps) == [False, True]
        leader, other = apps if notifier(apps[0]) else apps[::-1]
        endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        created = other.post(
            "/fhir/Subscription",
            json=subscription(endpoint, "Observation?code=anomaly-score"),
            headers=HEADERS,
        )
        assert created.status_code == 201, created.text
        # Written through both processes: the notifier must learn of the Subscription and of
        # the Observations the other process stored.
        written = [write(apps[n % 2], scored(f"20.{n}", f"P{n}"))["id"] for n in range(6)]
        expected = sorted(f"/hook/Observation/{i}" for i in written)
        wait_for(lambda: len(receiver.received) >= len(written), DEADLINE_S, "deliveries")
        wait_for(lambda: pending_changes(leader) == 0, DEADLINE_S, "the outbox to drain")
        assert sorted(r[1] for r in receiver.received) == expected


def test_notifier_lock_passes_to_a_waiting_process(postgres: LocalPostgres) -> None:
    settings = pg_settings(postgres.database_url())
    with ExitStack() as stack:
        first = stack.enter_context(TestClient(create_app(settings)))
        with TestClient(create_app(settings)) as second:
            assert notifier(first) and not notifier(second)
            stack.close()  # the notifier process goes away
            wait_for(lambda: notifier(second), DEADLINE_S, "the second process to take over")


@pytest.fixture
def served(postgres: LocalPostgres, tmp_path: Path) -> Iterator[tuple[str, list[dict]]]:
    """``scanwatch-fhir-api serve --workers 2`` over a fresh database: (base URL, the JSON log
    records it wrote so far, a live list)."""
    port = free_port()
    env = os.environ | {
        "SCANWATCH_FHIR_AUTH_MODE": "off",
        "SCANWATCH_FHIR_HOST": "127.0.0.1",
        "SCANWATCH_FHIR_LOG_LEVEL": "INFO",
        "SCANWATCH_FHIR_SUBSCRIPTION_POLL_S": "0.05",
        "SCANWATCH_FHIR_SIGNING_KEYS_FILE": str(tmp_path / "signing-keys.json"),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.fhir_api",
            "--port",
            str(port),
            "--database-url",
            postgres.database_url(),
            "--workers",
            "2",
            "serve",
        ],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    records: list[dict] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("{"):
                records.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield f"http://127.0.0.1:{port}", records
    finally:
        process.terminate()
        process.wait(timeout=DEADLINE_S)
        reader.join(timeout=DEADLINE_S)


def test_serve_with_two_workers_migrates_once_and_notifies_once(
    served: tuple[str, list[dict]],
    receiver: Receiver,  # noqa: F811
) -> None:
    base, records = served

    def ready() -> list[dict]:
        found = [r for r in records if r["msg"] == "FHIR API ready"]
        return found if len(found) == 2 else []

    workers = wait_for(ready, DEADLINE_S, "two workers")
    assert len({w["pid"] for w in workers}) == 2
    assert sorted(w["notifier"] for w in workers) == [False, True]
    assert [r["msg"] for r in records].count("database schema up to date") == 1

    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    with httpx.Client(base_url=base) as http:
        created = http.post(
            "/fhir/Subscription",
            json=subscription(endpoint, "Observation?code=anomaly-score"),
            headers=HEADERS,
        )
        assert created.status_code == 201, created.text
    written = []
    for n in range(8):
        # A new connection per study, so the writes spread over both workers.
        with httpx.Client(base_url=base) as http:
            written.append(write(http, scored(f"30.{n}", f"P{n}"))["id"])  # type: ignore[arg-type]
    wait_for(lambda: len(receiver.received) >= len(written), DEADLINE_S, "deliveries")
    assert sorted(r[1] for r in receiver.received) == sorted(
        f"/hook/Observation/{i}" for i in written
    )


def test_settings_keep_sqlite_to_one_worker(tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'fhir.db'}"
    assert Settings(database_url=sqlite).worker_count == 1
    with pytest.raises(ValueError, match="one process"):
        Settings(database_url=sqlite, workers=2)
    postgresql = "postgresql+psycopg://u@127.0.0.1/db"
    assert Settings(database_url=postgresql, workers=3).worker_count == 3
    assert 1 <= Settings(database_url=postgresql).worker_count <= 4
