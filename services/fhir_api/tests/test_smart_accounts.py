"""Patient accounts in the store, on SQLite and PostgreSQL: concurrent failed sign-ins all
count (the lock is reached however they interleave), and an account is found only by its
username, linked to nothing but the Patient's logical id."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from scanwatch.database import make_engine
from services.auth import accounts
from services.fhir_api import migrate

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery staple"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def test_concurrent_failures_all_count_and_lock_the_account(engine: Engine) -> None:
    token = accounts.invite_patient(engine, "patient-1", now=NOW)
    accounts.activate(engine, token, "Grace", PASSWORD, NOW)
    policy = accounts.SignInPolicy(max_failures=5)

    def attempt(_: int) -> accounts.User | None:
        return accounts.sign_in(engine, "grace", "a wrong password!", "", NOW, policy)

    with ThreadPoolExecutor(5) as pool:
        assert list(pool.map(attempt, range(5))) == [None] * 5
    assert accounts.sign_in(engine, "grace", PASSWORD, "", NOW, policy) is None  # locked
    with Session(engine) as session:
        (account,) = session.exec(select(accounts.Account)).all()
    assert account.username == "grace" and account.patient == "patient-1"
    assert account.kind == accounts.PATIENT and account.roles is None
    assert account.password_hash.startswith("$argon2id$") and PASSWORD not in account.password_hash
    assert account.locked_until is not None
