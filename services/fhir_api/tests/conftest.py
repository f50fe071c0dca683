"""Fixtures of the FHIR API tests: the app over SQLite and over a throwaway PostgreSQL
cluster (every app-level test runs against both), with authorization on.

PostgreSQL comes from Debian's ``postgresql`` package: ``initdb`` + ``pg_ctl`` start a cluster
in a temporary folder on a free loopback port for the session. PostgreSQL refuses to run as
root, so as root (CI) the cluster runs as the dedicated system user ``scanwatch-pg``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from devtools.kafka_local import free_port
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

PG_USER = "scanwatch-pg"
#: Every store test runs on both; the PostgreSQL runs need a real cluster (integration).
BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.integration))


class LocalPostgres:
    """A PostgreSQL cluster in ``root`` on ``port``; ``database_url()`` makes a fresh database."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not bins:
            raise FileNotFoundError("PostgreSQL is not installed (Debian package postgresql)")
        self.bin = Path(bins[-1])
        self.user = PG_USER if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        if self.user:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        self.user,
                    ],
                    check=True,
                    capture_output=True,
                )
            shutil.chown(self.root, self.user)
            os.chmod(self.root, 0o700)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._pg_ctl(
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off",
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def restart(self) -> None:
        """Stop at once (every connection is cut) and start again on the same port."""
        self._pg_ctl("-m", "immediate", "restart")

    def _pg_ctl(self, *args: str) -> None:
        """``pg_ctl`` that waits and logs to a file (a server holding our output pipes open
        would block ``_run``)."""
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.root / "postgres.log"),
            *args,
        )

    def database_url(self) -> str:
        import psycopg

        name = f"fhir_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


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
