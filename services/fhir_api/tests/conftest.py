"""Fixtures of the FHIR API tests: the app over SQLite and over a throwaway PostgreSQL
cluster (every app-level test runs against both), with authorization on.

PostgreSQL comes from Debian's ``postgresql`` package: ``initdb`` + ``pg_ctl`` start a cluster
in a temporary folder on a free loopback port for the session. PostgreSQL refuses to run as
root, so as root (CI) the cluster runs as the dedicated system user ``scanwatch-pg``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from devtools.kafka_local import free_port
from devtools.postgres_local import LocalPostgres
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

#: Every store test runs on both; the PostgreSQL runs need a real cluster (integration).
BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.integration))


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    # Not under pytest's tmp folder: its parents are private to root, and the cluster may run
    # as another user.
    root = Path(tempfile.mkdtemp(prefix="scanwatch-pg-"))
    try:
        cluster = LocalPostgres(root, free_port())
    except FileNotFoundError as exc:
        shutil.rmtree(root)
        pytest.fail(f"PostgreSQL is not installed ({exc}); scripts/bootstrap.sh installs it")
    try:
        cluster.start()
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'fhir.db'}"
    return request.getfixturevalue("postgres").database_url()


@pytest.fixture
def settings(database_url: str, signing_keys: Path) -> Settings:
    return Settings(
        database_url=database_url,
        max_count=50,
        auth_mode="required",
        signing_keys_file=signing_keys,
        subscription_backoff_s=0.05,
        subscription_max_attempts=3,
        subscription_timeout_s=2.0,
    )


@pytest.fixture
def tokens(settings: Settings) -> TokenService:
    """Issues tokens the app accepts (signed with the key set of ``settings``)."""
    return TokenService(load_key_set(settings.signing_keys_file))


@pytest.fixture
def issue(tokens: TokenService) -> Callable[..., str]:
    """``issue(scope, patient=None, lifetime=None)``: a signed access token."""

    def make(scope: str, patient: str | None = None, lifetime: timedelta | None = None) -> str:
        scopes = [Scope.parse(s) for s in scope.split()]
        return tokens.issue("test-client", scopes, patient, lifetime)[0]

    return make


@pytest.fixture
def client(settings: Settings, issue: Callable[..., str]) -> Iterator[TestClient]:
    """A client whose token may read and write everything (system/*.*)."""
    token = issue("system/*.read system/*.write")
    with TestClient(
        create_app(settings), headers={"Authorization": f"Bearer {token}"}
    ) as test_client:
        yield test_client
