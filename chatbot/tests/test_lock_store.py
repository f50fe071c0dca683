"""The lock store that lets the Rasa server run several worker processes
(connectors/lock_store.py): one message per conversation at a time, whether the other holder
is a coroutine of the same process or another process; other conversations go on; Rasa takes
it from endpoints.yml and then allows more than one Sanic worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from connectors import lock_store
from connectors.lock_store import FileLockStore
from rasa.core.lock_store import LockError, LockStore
from rasa.core.utils import number_of_sanic_workers
from rasa.utils.endpoints import read_endpoint_config

CHATBOT = Path(__file__).resolve().parent.parent


def refusals(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set each time a lock is tried and found held (the store's own try)."""
    refused = asyncio.Event()
    try_lock = lock_store._try_lock

    def counted(fd: int) -> bool:
        taken = try_lock(fd)
        if not taken:
            refused.set()
        return taken

    monkeypatch.setattr(lock_store, "_try_lock", counted)
    return refused


def other_bucket(store: FileLockStore, conversation: str) -> str:
    return next(
        name
        for name in (f"other-{n}" for n in range(100))
        if store.path(name) != store.path(conversation)
    )


def test_one_message_per_conversation_at_a_time_in_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileLockStore(lock_dir=str(tmp_path))
    order: list[str] = []

    async def handle(name: str, conversation: str, holding: asyncio.Event | None) -> None:
        async with store.lock(conversation):
            order.append(f"{name} in")
            if holding is not None:
                holding.set()
                await asyncio.wait_for(released.wait(), timeout=10)
            order.append(f"{name} out")

    async def main() -> None:
        refused = refusals(monkeypatch)
        holding = asyncio.Event()
        first = asyncio.create_task(handle("first", "patient-a", holding))
        await holding.wait()
        second = asyncio.create_task(handle("second", "patient-a", None))
        elsewhere = asyncio.create_task(handle("elsewhere", other_bucket(store, "patient-a"), None))
        await elsewhere  # another conversation is not held up
        await asyncio.wait_for(refused.wait(), timeout=10)  # the second has tried, and waits
        assert "second in" not in order
        released.set()
        await asyncio.gather(first, second)

    released = asyncio.Event()
    asyncio.run(main())
    assert order.index("first out") < order.index("second in")
    assert order.index("elsewhere out") < order.index("first out")


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


def test_another_process_holding_the_conversation_makes_it_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileLockStore(lock_dir=str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.path("patient-a"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        async def attempt(lifetime: float) -> None:
            async with store.lock("patient-a", lock_lifetime=lifetime):
                pass

        with pytest.raises(LockError):
            asyncio.run(attempt(0.2))

        async def after_release() -> None:
            refused = refusals(monkeypatch)
            waiting = asyncio.create_task(attempt(30))
            await asyncio.wait_for(refused.wait(), timeout=10)  # it has tried, and waits
            assert not waiting.done()
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
            await asyncio.wait_for(waiting, timeout=30)

        asyncio.run(after_release())
    finally:
        holder.kill()
        holder.wait()


def test_lock_files_name_no_conversation(tmp_path: Path) -> None:
    store = FileLockStore(lock_dir=str(tmp_path / "locks"))
    assert "patient-a" not in store.path("patient-a").name
    assert store.path("patient-a") == store.path("patient-a")


def test_rasa_reads_it_from_endpoints_and_allows_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "SCANWATCH_CHAT_ACTION_URL": "http://127.0.0.1:5055/webhook",
        "SCANWATCH_CHAT_DB_URL": f"sqlite:///{tmp_path / 'conversations.db'}",
        "SCANWATCH_CHAT_RETENTION_DAYS": "30",
        "SCANWATCH_CHAT_LOCK_DIR": str(tmp_path / "locks"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SANIC_WORKERS", "2")
    config = read_endpoint_config(str(CHATBOT / "endpoints.yml"), "lock_store")
    assert isinstance(LockStore.create(config), FileLockStore)
    assert number_of_sanic_workers(config) == 2
    with pytest.raises(ValueError, match="SCANWATCH_CHAT_LOCK_DIR"):
        FileLockStore(lock_dir="")
