"""``scanwatch-listener`` / ``python -m dicom_listener``: serve until SIGTERM or SIGINT.

Configuration comes from ``SCANWATCH_LISTENER_*`` environment variables (see
:class:`dicom_listener.config.Settings`). With ``workers`` > 1 this process is the primary
(HTTP server) and starts ``workers - 1`` worker processes that share the DICOM port, plus the
publisher process (``publisher_process``); it restarts a child that dies and stops them all on
exit.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading

from prometheus_client import make_wsgi_app
from pydantic import ValidationError

from dicom_listener.adapters.outbox import Outbox
from dicom_listener.adapters.publisher import FlushSignal, KafkaSink, OutboxRelay
from dicom_listener.config import Settings
from dicom_listener.metrics import ListenerMetrics
from scanwatch.http_access import HttpServer, guard_wsgi
from scanwatch.logs import configure_logging, log_invalid_settings
from scanwatch.processes import die_with_parent

SERVICE = "dicom-listener"
#: Seconds between checks that every worker process is alive.
SUPERVISE_INTERVAL_S = 1.0
#: Longest final drain when the publisher process stops.
PUBLISHER_STOP_S = 5.0
#: Pause between attempts to take the publisher lock from another publisher.
LOCK_RETRY_S = 0.2
#: Seconds a worker gets to finish its associations on stop.
WORKER_STOP_S = 15.0
log = logging.getLogger("dicom_listener")


def _spawn(role: str, port: int) -> subprocess.Popen[bytes]:
    """A child process of this listener: ``--worker`` or ``--publisher``."""
    env = {**os.environ, "SCANWATCH_LISTENER_PORT": str(port)}
    argv = [sys.executable, "-m", "dicom_listener", role, "--parent", str(os.getpid())]
    return subprocess.Popen(argv, env=env)


def _orphaned(parent: int) -> bool:
    """True once the process that started this child is gone (it was killed with -9)."""
    return os.getppid() != parent


def run_publisher(settings: Settings, stop: threading.Event, parent: int) -> int:
    """The publisher process: drain the outbox to Kafka until ``stop`` or the parent dies.

    An exclusive lock on ``<outbox>.publisher.lock`` makes sure that one publisher at a time
    drains the outbox (a restarted listener's publisher waits for an orphaned one to exit).
    """
    lock_path = f"{settings.resolved_outbox_path}.publisher.lock"
    settings.resolved_outbox_path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if stop.wait(LOCK_RETRY_S) or _orphaned(parent):
                os.close(lock_fd)
                return 0
    metrics = ListenerMetrics()
    outbox = Outbox(settings.resolved_outbox_path)
    outbox.open()  # a crash's lost renames are redone before their events go out
    relay = OutboxRelay(
        outbox,
        KafkaSink(settings.kafka_bootstrap_servers, settings.kafka_timeout_s),
        metrics,
        listener_id=settings.resolved_listener_id,
        batch_size=settings.publish_batch_size,
        retry_max_s=settings.publish_retry_max_s,
        idle_poll_s=settings.publish_poll_s,
        linger_s=settings.publish_linger_s,
    )
    # Before the metrics port opens: once it answers, association ends reach this process.
    flush_signal = FlushSignal(settings.resolved_outbox_path)
    flush_signal.serve(relay.flush)
    http = None
    if settings.publisher_metrics_port:
        try:
            http = HttpServer(
                settings.host,
                settings.publisher_metrics_port,
                guard_wsgi(make_wsgi_app(metrics.registry), settings.metrics_secret, settings.host),
            )
            http.start()
        except OSError as exc:  # publishing matters more than its metrics
            log.error(
                "publisher metrics port unavailable: %s",
                exc,
                extra={"port": settings.publisher_metrics_port},
            )
    relay.start()
    log.info(
        "publisher running",
        extra={
            "outbox": str(settings.resolved_outbox_path),
            "listener_id": settings.resolved_listener_id,
        },
    )
    while not stop.wait(SUPERVISE_INTERVAL_S) and not _orphaned(parent):
        pass
    # A final drain, bounded: whatever is left stays in the outbox for the next publisher,
    # so a Kafka client stuck in close() must not keep this process (and its lock) alive.
    flush_signal.close()
    stopper = threading.Thread(target=relay.stop, name="publisher-stop", daemon=True)
    stopper.start()
    stopper.join(PUBLISHER_STOP_S)
    os.close(lock_fd)
    if http is not None:
        http.stop()
    if stopper.is_alive():
        log.warning("publisher did not stop in time; exiting, events stay in the outbox")
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scanwatch-listener",
        description="DICOM Storage SCP for MR: stores instances, announces them on Kafka. "
        "Configured by SCANWATCH_LISTENER_* environment variables.",
    )
    role = parser.add_mutually_exclusive_group()
    role.add_argument(
        "--worker", action="store_true", help="internal: run as a secondary worker process"
    )
    role.add_argument(
        "--publisher", action="store_true", help="internal: run as the publisher process"
    )
    parser.add_argument("--parent", type=int, help="internal: pid of the primary process")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        configure_logging(SERVICE)
        log_invalid_settings(log, exc)
        return 2
    configure_logging(SERVICE, settings.log_level)

    # Given by the primary: a child that reads getppid() itself may already see init's pid
    # when the primary was killed while the child was starting.
    parent = args.parent or os.getppid()
    if args.worker or args.publisher:
        # The kernel kills this child when the listener dies (``kill -9``), so that no orphaned
        # publisher or worker outlives it. Safe: a worker's unanswered C-STOREs were never
        # acknowledged, and a publisher's undeleted events are sent again by the next one.
        # Where that cannot be arranged, the parent checks below still apply.
        die_with_parent(signal.SIGKILL)
        if _orphaned(parent):
            return 0
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    if args.publisher:
        try:
            return run_publisher(settings, stop, parent)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    separate_publisher = settings.publisher_process and not args.worker
    roles: list[str] = []
    workers: list[subprocess.Popen[bytes]] = []
    if separate_publisher:  # first: it starts draining while this process gets ready
        roles.append("--publisher")
        workers.append(_spawn("--publisher", settings.port))
    # Imported here: the publisher process does without pydicom and the DICOM server.
    from dicom_listener.app import create_app

    app = create_app(settings, primary=not args.worker, run_relay=not separate_publisher)
    if separate_publisher:
        app.health.publisher_alive = lambda: workers[0].poll() is None
        app.health.kafka_state = lambda: "see the publisher process's log"
    try:
        try:
            app.start()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
            app.stop(grace_s=0)
            for worker in workers:
                worker.kill()
                worker.wait()
            return 1
        if not args.worker:
            extra = ["--worker"] * (settings.workers - 1)
            roles += extra
            workers += [_spawn(role, app.port) for role in extra]
        while not stop.wait(SUPERVISE_INTERVAL_S):
            if args.worker and _orphaned(parent):
                break
            for i, worker in enumerate(workers):
                if worker.poll() is not None:
                    log.error(
                        "child process exited, restarting",
                        extra={"role": roles[i], "rc": worker.returncode},
                    )
                    workers[i] = _spawn(roles[i], app.port)
        log.info("stopping")
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        app.stop()
        for worker in workers:
            try:
                worker.wait(timeout=WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
