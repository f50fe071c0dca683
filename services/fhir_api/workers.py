"""The worker processes of ``scanwatch-fhir-api serve --workers N``: N uvicorn servers in
spawned processes, each building its app with :func:`services.fhir_api.app.worker_app` (the
database was prepared before they start).

Each worker listens on its own ``SO_REUSEPORT`` socket, so the kernel spreads connections over
the workers. With one shared socket, whichever worker woke first accepted every pending
connection: 8 keep-alive clients often all landed on one worker while the other idled (440
instead of 390 searches/s, bench/fhir.md). The supervisor holds the address bound (not
listening, so it is never handed a connection) for as long as it runs.

Not ``uvicorn.run(workers=N)``: the socket uvicorn makes has ``proto`` 0, so asyncio does not
set TCP_NODELAY on the connections it accepts, and every keep-alive response then waits ~40 ms
for the client's delayed ACK (https://github.com/Kludex/uvicorn/issues/3149; measured here: 130
instead of 230 searches/s with 8 clients).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections import deque
from multiprocessing.process import BaseProcess

import uvicorn

log = logging.getLogger(__name__)

#: Pending connections the shared socket queues.
BACKLOG = 2048
#: Seconds between checks that every worker lives.
CHECK_S = 0.5
#: Seconds a worker gets to finish its requests at shutdown.
STOP_S = 30.0
#: More worker deaths than this within RESTART_WINDOW_S stop the server (its supervisor
#: restarts it): a worker that cannot start would otherwise be restarted forever.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
APP = "services.fhir_api.app:worker_app"


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket (``proto`` IPPROTO_TCP: see the module docstring) bound to host:port with
    ``SO_REUSEPORT``, not yet listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def run_worker(host: str, port: int, options: dict[str, object]) -> None:
    """One worker process: a uvicorn server on its own socket of the port."""
    sock = bound_socket(host, port)
    sock.listen(BACKLOG)
    config = uvicorn.Config(APP, factory=True, **options)  # type: ignore[arg-type]
    uvicorn.Server(config).run(sockets=[sock])


def supervise(host: str, port: int, workers: int, options: dict[str, object]) -> bool:
    """Serve with ``workers`` processes until SIGTERM/SIGINT; a worker that dies is replaced
    (its in-flight requests fail, the others keep serving). False when workers kept dying."""
    reserved = bound_socket(host, port)
    port = reserved.getsockname()[1]  # the one chosen for port 0
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())

    def start() -> BaseProcess:
        process = context.Process(
            target=run_worker, args=(host, port, options), name="fhir-api-worker"
        )
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    log.info("workers started", extra={"pids": [p.pid for p in processes]})
    deaths: deque[float] = deque()
    healthy = True
    while healthy and not stopping.wait(CHECK_S):
        for i, process in enumerate(processes):
            if process.is_alive():
                continue
            now = time.monotonic()
            deaths.append(now)
            while deaths and deaths[0] < now - RESTART_WINDOW_S:
                deaths.popleft()
            if len(deaths) > MAX_RESTARTS:
                log.error("workers keep dying; stopping", extra={"exitcode": process.exitcode})
                healthy = False
                break
            log.error("worker died; starting another", extra={"exitcode": process.exitcode})
            processes[i] = start()
    for process in processes:
        process.terminate()  # uvicorn's graceful shutdown
    for process in processes:
        process.join(STOP_S)
        if process.is_alive():
            process.kill()
    reserved.close()
    return healthy
