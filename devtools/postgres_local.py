"""A throwaway PostgreSQL cluster for tests: Debian's ``initdb`` + ``pg_ctl`` start it in a
folder on a loopback port. PostgreSQL refuses to run as root, so as root (CI) the cluster runs
as the dedicated system user ``scanwatch-pg``. Standard library only: the chatbot's tests (in
Rasa's own virtualenv) use it too.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

PG_USER = "scanwatch-pg"


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
        self.resume()

    def resume(self) -> None:
        """Start the server of an initialised cluster (after :meth:`stop`), on the same port."""
        self._pg_ctl(
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off",
            "start",
        )

    def stop(self) -> None:
        """Stop at once (every connection is cut); :meth:`resume` starts it again."""
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

    def database_url(self, driver: str = "psycopg") -> str:
        """A new, empty database's SQLAlchemy URL (``postgresql+<driver>://``; ``driver=""``:
        SQLAlchemy's default, psycopg2, as Rasa's tracker store uses)."""
        name = f"db_{uuid.uuid4().hex[:12]}"
        done = subprocess.run(
            [
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                name,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode:
            raise RuntimeError(f"createdb failed: {done.stderr.strip()}")
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{name}"
