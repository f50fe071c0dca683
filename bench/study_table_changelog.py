"""The study table's changelog per study: the whole state per write (the old layout) against
:class:`inference_worker.study_store.StudyStore` (a header and an entry per instance).

    .venv/bin/python bench/study_table_changelog.py [--instances 38 2000] [--old-up-to 3000]

Each study's instance events (64-character UIDs, as ``pydicom.uid.generate_uid`` makes them;
a storage URI under ``/var/lib/scanwatch/store``; the listener's count headers, one
acquisition, unless ``--no-counts``) are assembled by the worker's own
:class:`~inference_worker.flow.WorkerFlow`, 10 ms apart, then announced and scored by a fake
scorer; every table write is taken as the changelog record Faust would send (the raw key, the
value in Faust's JSON codec). Printed per layout: records, total bytes, bytes per instance, the
largest record, the instance whose record first passes Kafka's default 1 MB
(``message.max.bytes``, ``max.request.size``), and the CPU seconds of the assembly. The old
layout is measured up to ``--old-up-to`` instances (its cost is quadratic).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from faust.serializers import codecs
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.benchmarks import commit, say  # noqa: E402
from inference_worker.assembly import ACQUISITION_NUMBER, IMAGES_IN_ACQUISITION  # noqa: E402
from inference_worker.config import Settings  # noqa: E402
from inference_worker.flow import Origin, WorkerFlow  # noqa: E402
from inference_worker.metrics import WorkerMetrics  # noqa: E402
from inference_worker.study_store import StudyStore  # noqa: E402
from schemas import (  # noqa: E402
    InferenceResultV1,
    InstanceReceivedV1,
    StudyReadyV1,
)

KAFKA_RECORD_LIMIT = 1_048_576
QUIET_S = 5.0


class RecordingTable(dict[bytes, Any]):
    """A dict standing in for the Faust table; each write's changelog record size kept."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.sizes.append(len(key) + len(codecs.dumps("json", value)))
        super().__setitem__(key, value)


class Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, *, key: bytes | None, value: bytes) -> None:
        self.sent.append(value)


class Scorer:
    """Scores every study at once (the flow reads ``scorer.model`` only at start)."""

    model: Any = None

    async def score(self, ready: StudyReadyV1) -> InferenceResultV1:
        return InferenceResultV1(
            StudyInstanceUID=ready.StudyInstanceUID,
            SeriesInstanceUID=ready.instances[0].SeriesInstanceUID,
            model_name="m",
            model_version=1,
            class_names=["normal", "mass"],
            probabilities=[0.5, 0.5],
            predicted_class="mass",
            anomaly_score=0.5,
            threshold=0.5,
            slice_count=len(ready.instances),
            observation_id="obs",
        )


def events(count: int) -> tuple[str, list[InstanceReceivedV1]]:
    study, series = generate_uid(), generate_uid()
    made = []
    for n in range(count):
        sop = generate_uid()
        made.append(
            InstanceReceivedV1(
                StudyInstanceUID=study,
                SeriesInstanceUID=series,
                SOPInstanceUID=sop,
                SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
                TransferSyntaxUID="1.2.840.10008.1.2.1",
                Modality="MR",
                storage_uri=f"file:///var/lib/scanwatch/store/{study}/{series}/{sop}.dcm",
                size_bytes=140_000,
                sha256=f"{n:064x}",
                calling_ae_title="MR1",
                called_ae_title="SCANWATCH",
            )
        )
    return study, made


def measure(layout: str, count: int, counts: bool = True) -> dict[str, Any]:
    table = RecordingTable()
    studies: Any = table if layout == "old" else StudyStore(table)
    clock = [1_800_000_000.0]
    ready = Sink()
    flow = WorkerFlow(
        Settings(quiet_period_s=QUIET_S),
        Scorer(),
        studies,
        ready,
        Sink(),
        lambda topic: Sink(),
        lambda key: True,
        WorkerMetrics(),
        clock=lambda: clock[0],
    )
    study, instances = events(count)
    headers: tuple[tuple[str, bytes], ...] = ()
    if counts:
        headers = ((IMAGES_IN_ACQUISITION, str(count).encode()), (ACQUISITION_NUMBER, b"1"))

    async def run() -> float:
        started = time.process_time()
        for event in instances:
            clock[0] += 0.01
            at = datetime.fromtimestamp(clock[0], UTC)
            value = event.model_copy(update={"occurred_at": at}).to_bytes()
            await flow.assemble(value, Origin(InstanceReceivedV1.SCHEMA, headers=headers))
        cpu = time.process_time() - started
        clock[0] += QUIET_S
        await flow.release_ready_studies()
        [announced] = ready.sent
        await flow.score(announced, Origin(StudyReadyV1.SCHEMA, 0, 0, study.encode()))
        return cpu

    cpu = asyncio.run(run())
    sizes = table.sizes
    over = next((i + 1 for i, size in enumerate(sizes) if size > KAFKA_RECORD_LIMIT), None)
    return {
        "layout": layout,
        "instances": count,
        "records": len(sizes),
        "total_bytes": sum(sizes),
        "bytes_per_instance": round(sum(sizes) / count),
        "largest_record": max(sizes),
        "first_record_over_1MB": over,
        "assembly_cpu_s": round(cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[38, 2000])
    parser.add_argument("--old-up-to", type=int, default=3000)
    parser.add_argument(
        "--no-counts",
        action="store_true",
        help="instances without ImagesInAcquisition (no acquisition kept per instance)",
    )
    opts = parser.parse_args()
    say(f"commit {commit()}")
    for count in opts.instances:
        for layout in ("old", "store"):
            if layout == "old" and count > opts.old_up_to:
                continue
            figures = measure(layout, count, not opts.no_counts)
            say(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
