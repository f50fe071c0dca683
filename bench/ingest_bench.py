"""Ingest benchmark: C-STORE throughput of the scanwatch listener against real peers.

Sends the same corpus (10 MR studies × 38 slices of 197×233 16-bit pixels, built from the
MNI152 volume by ``scanwatch.sample``) with dcmtk ``storescu`` (``TCP_NODELAY=1``) to:

* ``scanwatch``: ``python -m dicom_listener`` (every instance fsync'd, its event committed to the
  SQLite outbox before success; the clock stops when Kafka acknowledged every event),
* Orthanc (Debian package, default configuration, SQLite index),
* dcmtk ``storescp`` (``--fork`` so that associations run in parallel),
* pynetdicom's ``storescp`` app,

with 1 and with 4 concurrent associations (the files split evenly), each run against a fresh
storage folder, the targets' runs interleaved so that a noisy neighbour slows all alike. Every
target first receives a small warm-up study, untimed (for scanwatch: until its events are on
Kafka), so that the figures are a running receiver's, not its start-up. Prints a Markdown
table (instances/s and MB/s of Part 10 bytes sent).

    .venv/bin/python bench/ingest_bench.py [--repeat 2] [--studies 10] [--slices 38]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.kafka_local import LocalKafka, free_port  # noqa: E402
from devtools.orthanc import LocalOrthanc  # noqa: E402
from devtools.peers import dcmtk_env, echoscu  # noqa: E402
from devtools.testing import wait_for  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402

AE = "BENCH"
#: A 4-slice study sent untimed to each target before its timed run (set by ``main``).
WARMUP: list[Path] = []
#: Events produced before the first run: the broker's produce path reaches its compiled speed
#: only after several thousand (it costs 0.24 ms of broker CPU per event in the first 6,000
#: and 0.04 ms after 12,000, measured on the dev VM).
BROKER_WARM_UP_EVENTS = 30_000
KAFKA_LIBS = Path(os.environ.get("SCANWATCH_VAR", ROOT / "var")) / "kafka" / "libs"


@dataclass
class Result:
    target: str
    associations: int
    seconds: float
    instances: int
    megabytes: float


def send(files: list[Path], port: int, associations: int, called_ae: str = AE) -> float:
    """storescu with ``associations`` parallel processes; seconds until all finished."""
    groups = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called_ae, "127.0.0.1", str(port), *map(str, group)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


@contextmanager
def process(argv: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def warm_broker(kafka: LocalKafka, events: int = BROKER_WARM_UP_EVENTS) -> None:
    """Send ``events`` events through the listener's own Kafka sink, in batches of 15, so that
    the broker's JVM has compiled the produce path the runs use."""
    from dicom_listener.adapters.outbox import OutboxEvent
    from dicom_listener.adapters.publisher import KafkaSink
    from schemas.events import InstanceReceivedV1

    sink = KafkaSink(kafka.bootstrap_servers, timeout_s=10)
    batch = [
        OutboxEvent(i, InstanceReceivedV1.SCHEMA, b"warm-up-%d" % i, bytes(700), [], 0.0)
        for i in range(15)
    ]
    for _ in range(0, events, len(batch)):
        sink.send_batch(batch)
    sink.close()


def undelivered(outbox: Path) -> int:
    """Events Kafka has not acknowledged yet (the publisher deletes an event only after its
    acknowledgement), read from the outbox itself: the listener's /healthz writes and fsyncs
    a probe file on every call, too heavy to ask every 2 ms while the clock runs."""
    with closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def run_scanwatch(files: list[Path], n: int, work: Path, kafka: LocalKafka) -> float:
    port = free_port()
    outbox = work / ".scanwatch" / "outbox.sqlite3"
    env = {
        **os.environ,
        "SCANWATCH_LISTENER_AE_TITLE": AE,
        "SCANWATCH_LISTENER_PORT": str(port),
        "SCANWATCH_LISTENER_STORAGE_DIR": str(work),
        "SCANWATCH_LISTENER_OUTBOX_PATH": str(outbox),
        "SCANWATCH_LISTENER_METRICS_PORT": "0",
        "SCANWATCH_LISTENER_PUBLISHER_METRICS_PORT": "0",
        "SCANWATCH_LISTENER_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SCANWATCH_LISTENER_LOG_LEVEL": "WARNING",
    }
    with process([sys.executable, "-m", "dicom_listener"], env):
        wait_for(lambda: echoscu("127.0.0.1", port, AE, timeout=1), 30, "listener up")
        send(WARMUP, port, 1)
        wait_for(lambda: undelivered(outbox) == 0, 120, "warm-up events on Kafka")
        started = time.perf_counter()
        send(files, port, n)
        # Every instance stored (storescu saw success for each), and every event acknowledged
        # by Kafka.
        assert len(list(work.glob("*/*/*.dcm"))) == len(WARMUP) + len(files)
        # Checked every 2 ms: wait_for's default 50 ms would be a tenth of a run.
        wait_for(lambda: undelivered(outbox) == 0, 120, "events on Kafka", interval=0.002)
        return time.perf_counter() - started


def run_orthanc(files: list[Path], n: int, work: Path) -> float:
    orthanc = LocalOrthanc(work, http_port=free_port(), dicom_port=free_port(), aet=AE)
    orthanc.start()
    try:
        send(WARMUP, orthanc.dicom_port, 1)
        return send(files, orthanc.dicom_port, n)
    finally:
        orthanc.stop()


def run_storescp(files: list[Path], n: int, work: Path) -> float:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    argv = ["storescp", "--fork", "-aet", AE, "-od", str(work), str(port)]
    with process(argv, dcmtk_env()):
        wait_for(lambda: echoscu("127.0.0.1", port, AE, timeout=1), 30, "storescp up")
        send(WARMUP, port, 1)
        return send(files, port, n)


def run_pynetdicom(files: list[Path], n: int, work: Path) -> float:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pynetdicom", "storescp", "-aet", AE, "-od", str(work), str(port)]
    with process(argv):
        wait_for(lambda: echoscu("127.0.0.1", port, AE, timeout=1), 30, "pynetdicom up")
        send(WARMUP, port, 1)
        return send(files, port, n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=38)
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell (median reported)")
    parser.add_argument(
        "--targets", default="scanwatch,orthanc,storescp,pynetdicom", help="comma-separated"
    )
    parser.add_argument("--associations", default="1,4", help="comma-separated")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        files = [
            f
            for s in range(args.studies)
            for f in build_mr_study(
                root / "corpus" / f"{s:02d}", patient_id=f"SW-BENCH-{s:02d}", n_slices=args.slices
            )
        ]
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        WARMUP[:] = build_mr_study(root / "warmup", patient_id="SW-BENCH-WARMUP", n_slices=4)
        kafka = LocalKafka(
            root / "kafka", KAFKA_LIBS, port=free_port(), controller_port=free_port()
        )
        targets = args.targets.split(",")
        if "scanwatch" in targets:
            kafka.start()
        runners: dict[str, Callable[[list[Path], int, Path], float]] = {
            "scanwatch": lambda f, n, w: run_scanwatch(f, n, w, kafka),
            "orthanc": run_orthanc,
            "storescp": run_storescp,
            "pynetdicom": run_pynetdicom,
        }
        if "scanwatch" in targets:
            # The broker is a fresh JVM: the first thousands of events run in its interpreter
            # and JIT compiler. Warm it, then one untimed pass through the listener, so that
            # the runs measure a warm broker (as a production one is), not its start-up.
            warm_broker(kafka)
            run_scanwatch(files, 1, root / "runs" / "kafka-warm-up", kafka)
        results: list[Result] = []
        run_id = 0
        for n in [int(a) for a in args.associations.split(",")]:
            # Interleaved (a run of each target, then again), so that a noisy neighbour slows
            # every target alike instead of one row.
            times: dict[str, list[float]] = {target: [] for target in targets}
            for _ in range(args.repeat):
                for target in targets:
                    run_id += 1
                    work = root / "runs" / f"{run_id:03d}-{target}"
                    times[target].append(runners[target](files, n, work))
                    # Write back what this run left dirty (Orthanc and storescp do not fsync),
                    # so that the next target's fsyncs do not wait for it. The runs' files are
                    # removed only at the end: on ext4 without a journal (as on the dev VMs),
                    # each new inode is checked against every inode freed in the last minutes,
                    # so deleting a run's files slows the next run's file creation.
                    os.sync()
            for target in targets:
                seconds = statistics.median(times[target])
                results.append(Result(target, n, seconds, len(files), megabytes))
                print(  # noqa: T201 - progress of a command-line benchmark
                    f"{target:>10} x{n}: {len(files) / seconds:7.1f} inst/s "
                    f"{megabytes / seconds:6.1f} MB/s  runs {[round(t, 2) for t in times[target]]}",
                    file=sys.stderr,
                )
        kafka.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(  # noqa: T201
        f"\ncorpus: {len(files)} instances, {megabytes:.1f} MB; machine: {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; median of {args.repeat}\n"
    )
    print("| target | associations | seconds | instances/s | MB/s |")  # noqa: T201
    print("| --- | ---: | ---: | ---: | ---: |")  # noqa: T201
    for r in results:
        print(  # noqa: T201
            f"| {r.target} | {r.associations} | {r.seconds:.2f} | "
            f"{r.instances / r.seconds:.1f} | {r.megabytes / r.seconds:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
