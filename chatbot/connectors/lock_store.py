"""One message per conversation at a time, across every Rasa server process on the host, so
that the Rasa server can run several Sanic workers (``SANIC_WORKERS``).

Rasa handles a message under its lock store's lock for that conversation (read the tracker,
predict, run the actions, save). Its default, ``InMemoryLockStore``, holds the lock in one
process, so Rasa refuses more than one worker with it; with one worker, one core runs every
conversation's NLU and policies while the other core idles (bench/chatbot.py). Rasa's
``RedisLockStore`` would allow more, at the price of a Redis server. This store needs nothing
but the file system: the lock of a conversation is an exclusive ``flock`` on one of
:data:`BUCKETS` lock files in ``lock_dir``, chosen by a hash of the conversation id.

- ``flock`` belongs to the open file description: each acquisition opens its own, so two
  coroutines of one process exclude each other as two processes do, and a process that dies
  releases its locks with its files.
- Two conversations that share a bucket only wait for each other; they never share a lock's
  ownership. The file names are bucket numbers: no conversation id on disk.
- A lock is tried without blocking, then again every :data:`POLL_S` (Rasa's own stores poll
  every second) until ``lock_lifetime``, when :class:`~rasa.core.lock_store.LockError` is
  raised as Rasa's stores do.

Several hosts need a lock every replica sees: use Rasa's ``RedisLockStore`` there.

endpoints.yml::

    lock_store:
      type: connectors.lock_store.FileLockStore
      lock_dir: ${SCANWATCH_CHAT_LOCK_DIR}
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from rasa.core.lock import TicketLock
from rasa.core.lock_store import LOCK_LIFETIME, LockError, LockStore

#: Lock files; conversations are spread over them by a hash of their id.
BUCKETS = 1024
#: Seconds between two tries of a lock another message holds.
POLL_S = 0.01


class FileLockStore(LockStore):
    """Per-conversation locks as ``flock`` on files in ``lock_dir``, shared by every process
    that uses the same folder."""

    def __init__(self, endpoint_config: Any = None, lock_dir: str | None = None) -> None:
        if lock_dir is None and endpoint_config is not None:
            lock_dir = (endpoint_config.kwargs or {}).get("lock_dir")
        if not lock_dir:
            raise ValueError(
                "the lock store needs SCANWATCH_CHAT_LOCK_DIR, a folder every Rasa server "
                "process of this host can write"
            )
        self.lock_dir = Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, conversation_id: str) -> Path:
        digest = hashlib.blake2b(conversation_id.encode(), digest_size=8).digest()
        return self.lock_dir / f"{int.from_bytes(digest, 'big') % BUCKETS:04d}.lock"

    @asynccontextmanager
    async def lock(
        self,
        conversation_id: str,
        lock_lifetime: float = LOCK_LIFETIME,
        wait_time_in_seconds: float = POLL_S,
    ) -> AsyncGenerator[TicketLock, None]:
        """Hold the conversation's lock; :class:`LockError` after ``lock_lifetime`` seconds
        of waiting for it."""
        fd = os.open(self.path(conversation_id), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + lock_lifetime
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise LockError(
                        f"could not acquire the lock of a conversation in {lock_lifetime} s"
                    )
                await asyncio.sleep(min(wait_time_in_seconds, POLL_S))
            yield TicketLock(conversation_id)
        finally:
            os.close(fd)  # releases the flock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return False
        raise
    return True
