"""The worker's FHIR writes per study: requests, worker CPU and wall time (issue 20, point 4:
"write a study's FHIR resources as one transaction Bundle; no other avoidable round trips").

    .venv/bin/python bench/fhir_writes.py [--studies 60]

A real FHIR API (``services.fhir_api``, tokens required, SQLite in a temporary folder) runs in
its own process, as deployed; this process is the worker's side: ``FhirWriter`` with its
client credentials. Each study goes through the worker's three write steps: the registered
record (``put_missing``, while the model works), the scored resources (``put_all``) and their
rewrite with the heatmaps' reference (``put_all`` again; here a changed result stands for it,
which changes the Observation the same way). Printed: the HTTP requests of each step (the token
request left out) for the first study, then the median and p95 over ``--studies`` of this
process's CPU time (``time.process_time``: the HTTP client, JSON, the event loop) and of the
wall time. The cores are shared with other work: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.benchmarks import say  # noqa: E402
from devtools.kafka_local import free_port  # noqa: E402
from devtools.testing import wait_for  # noqa: E402
from inference_worker.adapters.fhir_writer import FhirWriter  # noqa: E402
from inference_worker.fhir_resources import (  # noqa: E402
    ScoredSeries,
    ScoredStudy,
    all_resources_for,
    registered_resources_for,
)
from services.auth.tokens import load_key_set  # noqa: E402

CLIENT, SECRET = "scanwatch-worker", "bench-secret-for-fhir-writes"


def serve(database: Path, keys: Path, port: int) -> None:
    """The FHIR API in this (child) process until it is killed."""
    from devtools.testing import served
    from services.fhir_api.app import create_app
    from services.fhir_api.config import Settings

    settings = Settings(
        database_url=f"sqlite:///{database}",
        port=port,
        auth_mode="required",
        signing_keys_file=keys,
        bootstrap_clients=f"{CLIENT}:{SECRET}:system/*.write system/*.read",
    )
    with served(create_app(settings), port):
        threading.Event().wait()


class Counting(httpx.AsyncBaseTransport):
    """The writer's transport, recording ``METHOD`` of each request but the token's."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.methods: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/auth/token"):
            self.methods.append(request.method)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def study(n: int) -> ScoredStudy:
    return ScoredStudy(
        PatientID=f"BENCH-{n}",
        StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.9{n}",
        series=ScoredSeries(f"1.2.826.0.1.3680043.8.498.9{n}.1", "MR", 38),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=38,
        model_name="brain-mri-anomaly",
        model_version=1,
        class_names=("normal", "mass"),
        probabilities=(0.3, 0.7),
        threshold=0.5,
        issued=datetime(2026, 1, 1, tzinfo=UTC),
    )


def rescored(scored: ScoredStudy) -> ScoredStudy:
    return ScoredStudy(**(vars(scored) | {"probabilities": (0.6, 0.4)}))


async def measure(base: str, studies: int) -> None:
    counting = Counting()
    writer = FhirWriter(base, client_id=CLIENT, client_secret=SECRET, transport=counting)
    try:
        await writer.put_all(all_resources_for(study(10**6)))  # the token, the connection
        counting.methods.clear()
        steps = (
            ("registered (put_missing)", lambda s: writer.put_missing(registered_resources_for(s))),
            ("scored (put_all)", lambda s: writer.put_all(all_resources_for(s))),
            ("rewrite (put_all)", lambda s: writer.put_all(all_resources_for(rescored(s)))),
        )
        cpu: list[float] = []
        wall: list[float] = []
        for n in range(studies):
            scored = study(n)
            started_cpu, started = time.process_time(), time.perf_counter()
            for name, step in steps:
                await step(scored)
                if n == 0:
                    say(f"  {name:26s} {len(counting.methods)} request(s): {counting.methods}")
                    counting.methods.clear()
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started)
    finally:
        await writer.close()
    for label, values in (("worker CPU", cpu), ("wall", wall)):
        ordered = sorted(values)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        say(
            f"  {label:10s} per study (3 steps): median {statistics.median(values) * 1000:.1f} ms,"
            f" p95 {p95 * 1000:.1f} ms (n={len(values)})"
        )


def healthy(port: int, api: multiprocessing.process.BaseProcess) -> bool:
    if not api.is_alive():
        raise RuntimeError("the FHIR API exited at start-up")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz").is_success
    except httpx.TransportError:
        return False


@contextmanager
def fhir_api(folder: Path, timeout: float = 60) -> Iterator[str]:
    """The FHIR API on SQLite in ``folder``, in a process of its own; its base URL."""
    keys = folder / "signing-keys.json"
    load_key_set(keys)  # creates it
    port = free_port()
    api = multiprocessing.get_context("spawn").Process(
        target=serve, args=(folder / "fhir.db", keys, port), daemon=True
    )
    api.start()
    try:
        wait_for(lambda: healthy(port, api), timeout=timeout, what="the FHIR API")
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        api.kill()
        api.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    args = parser.parse_args(argv)
    say(f"load average before: {os.getloadavg()[0]:.2f}")
    with fhir_api(Path(tempfile.mkdtemp(prefix="scanwatch-fhir-writes-"))) as base:
        asyncio.run(measure(base, args.studies))
    say(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
