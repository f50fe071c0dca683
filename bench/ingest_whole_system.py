"""Ingest while the whole system runs (issue 20's bar): scanwatch's listener inside the
development stack (``make run``'s settings: Kafka, the worker assembling and scoring studies as
they arrive, the model server, the FHIR API), against Orthanc, in the same run.

Each round sends the same corpus (``--studies`` MR studies of ``--slices`` instances, one
storescu per study, ``--associations`` at a time) to scanwatch's running stack and to a fresh
Orthanc, the two interleaved so that a noisy neighbour slows both alike; the clock stops when
storescu has seen every instance answered with success. Reported: the median instances/s of
each over the rounds, and the ratio; per round, the listener's mean time to make an instance
durable (``scanwatch_listener_store_seconds``: write, fsync, rename, outbox commit) and the
rest of each instance's share of the round; per round and receiver, the share of the send
window in which some task on the machine waited for a CPU or for I/O (Linux PSI "some"), and
the listener process's CPU per instance. Afterwards the stack must have scored every study
(checked, not timed).

    .venv/bin/python bench/ingest_whole_system.py [--rounds 3] [--studies 10] [--slices 38]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import send  # noqa: E402
from devtools.benchmarks import add_scoring_nice, stack_config  # noqa: E402
from devtools.faults import listener_metric  # noqa: E402
from devtools.kafka_local import free_port  # noqa: E402
from devtools.orthanc import LocalOrthanc  # noqa: E402
from devtools.stack import Stack  # noqa: E402
from devtools.testing import wait_for  # noqa: E402
from scanwatch import ids  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402


def corpus(folder: Path, round_: int, studies: int, slices: int) -> list[list[Path]]:
    return [
        build_mr_study(
            folder / f"r{round_}s{n}", patient_id=f"SW-ING-{round_}-{n}", n_slices=slices
        )
        for n in range(studies)
    ]


def send_studies(studies: list[list[Path]], port: int, associations: int, ae: str) -> float:
    """Seconds for every study to be acknowledged, ``associations`` storescu at a time."""
    started = time.perf_counter()
    for start in range(0, len(studies), associations):
        batch = [f for study in studies[start : start + associations] for f in study]
        send(batch, port, min(associations, len(studies) - start), ae)
    return time.perf_counter() - started


def store_time(stack: Stack) -> tuple[float, float]:
    """The listener's ``scanwatch_listener_store_seconds`` so far: (sum, count)."""
    total = listener_metric(stack, "scanwatch_listener_store_seconds_sum")
    count = listener_metric(stack, "scanwatch_listener_store_seconds_count")
    if total is None or count is None:
        raise RuntimeError("the listener's /metrics has no scanwatch_listener_store_seconds")
    return total, count


def pressure_ms(resource: str) -> float:
    """The machine's "some" stall time for ``resource`` (cpu, io) so far, from Linux PSI (ms):
    time in which at least one runnable task waited for a CPU, or for I/O."""
    line = Path(f"/proc/pressure/{resource}").read_text().splitlines()[0]
    return int(line.rsplit("total=", 1)[1]) / 1000


def cpu_ms(pid: int) -> float:
    """CPU time of process ``pid`` so far (every thread, ended ones included; ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def group_cpu_ms(groups: dict[str, int]) -> dict[str, float]:
    """CPU time so far of every live process in each named process group (ms): a stack
    service and the children it started (the listener's publisher)."""
    totals = dict.fromkeys(groups, 0.0)
    names = {pgid: name for name, pgid in groups.items()}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        name = names.get(int(fields[2]))  # pgrp
        if name is not None:
            totals[name] += (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    return totals


def stack_groups(stack: Stack) -> dict[str, int]:
    """The stack's services (each its own process group) and the Kafka broker."""
    groups = {s.name: s.process.pid for s in stack.services if s.process is not None}
    broker = stack.kafka.pid()
    if broker is not None:
        groups["kafka"] = os.getpgid(broker)
    return groups


class Window:
    """What one receiver's send window cost: stall shares of the machine and, for scanwatch,
    the listener process's CPU per instance; per stack process, its CPU per instance received
    in the window (in Orthanc's window too: the stack scoring what scanwatch took before)."""

    def __init__(self, pid: int | None = None, groups: dict[str, int] | None = None) -> None:
        self.pid = pid
        self.groups = groups or {}
        self.start = (time.monotonic(), pressure_ms("cpu"), pressure_ms("io"))
        self.cpu = cpu_ms(pid) if pid else 0.0
        self.group_cpu = group_cpu_ms(self.groups)

    def close(self, instances: int) -> dict[str, float]:
        wall, cpu_stall, io_stall = (
            after - before
            for after, before in zip(
                (time.monotonic(), pressure_ms("cpu"), pressure_ms("io")), self.start, strict=True
            )
        )
        out = {
            "cpu_some": round(cpu_stall / 1000 / wall, 2),
            "io_some": round(io_stall / 1000 / wall, 2),
        }
        if self.pid:
            out["listener_cpu_ms_per_instance"] = round(
                (cpu_ms(self.pid) - self.cpu) / instances, 2
            )
        for name, ms in group_cpu_ms(self.groups).items():
            out[f"{name}_cpu_ms_per_instance"] = round((ms - self.group_cpu[name]) / instances, 2)
        return out


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--studies", type=int, default=10)
    args.add_argument("--slices", type=int, default=38)
    args.add_argument("--associations", type=int, default=1)
    add_scoring_nice(args)
    opts = args.parse_args()
    load_before = os.getloadavg()
    scanwatch_rates: list[float] = []
    store_ms: list[float] = []  # the listener's durable write, per instance
    orthanc_rates: list[float] = []
    windows: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp)
        config = stack_config(var / "stack", scoring_nice=opts.scoring_nice)
        stack = Stack(config)
        stack.start()
        try:
            warm = corpus(var / "warm", 99, 1, 4)
            send_studies(warm, config.ports.dicom, 1, config.ae_title)
            scored: list[str] = []
            for round_ in range(opts.rounds):
                studies = corpus(var / "in", round_, opts.studies, opts.slices)
                count = sum(len(s) for s in studies)
                before = store_time(stack)
                groups = stack_groups(stack)
                window = Window(stack.service("dicom-listener").process.pid, groups)
                seconds = send_studies(
                    studies, config.ports.dicom, opts.associations, config.ae_title
                )
                scanwatch_rates.append(count / seconds)
                windows.append({"scanwatch": window.close(count)})
                after = store_time(stack)
                store_ms.append(1000 * (after[0] - before[0]) / max(after[1] - before[1], 1))
                scored += [f"SW-ING-{round_}-{n}" for n in range(opts.studies)]
                orthanc = LocalOrthanc(
                    var / f"orthanc{round_}",
                    http_port=free_port(),
                    dicom_port=free_port(),
                    aet="ORTHANC",
                )
                orthanc.start()
                try:
                    send_studies(warm, orthanc.dicom_port, 1, "ORTHANC")
                    pid = orthanc.pid
                    window = Window(groups=groups | ({"orthanc": pid} if pid else {}))
                    seconds = send_studies(
                        studies, orthanc.dicom_port, opts.associations, "ORTHANC"
                    )
                    orthanc_rates.append(count / seconds)
                    windows[-1]["orthanc"] = window.close(count)
                finally:
                    orthanc.stop()
            headers = stack.fhir_headers()

            def unscored() -> list[str]:
                return [
                    p
                    for p in scored
                    if not httpx.get(
                        f"{config.fhir_base}/Observation",
                        params={"patient": ids.patient_id(None, p)},
                        headers=headers,
                    )
                    .json()
                    .get("total")
                ]

            wait_for(lambda: not unscored(), 600, "every study scored")
        finally:
            stack.stop()
    report = {
        "rounds": opts.rounds,
        "instances_per_round": opts.studies * opts.slices,
        "associations": opts.associations,
        "scoring_nice": opts.scoring_nice,
        "scanwatch_instances_per_s": [round(r, 1) for r in scanwatch_rates],
        "orthanc_instances_per_s": [round(r, 1) for r in orthanc_rates],
        "scanwatch_median": round(statistics.median(scanwatch_rates), 1),
        "orthanc_median": round(statistics.median(orthanc_rates), 1),
        "ratio": round(statistics.median(scanwatch_rates) / statistics.median(orthanc_rates), 2),
        "scanwatch_store_ms_per_instance": [round(m, 2) for m in store_ms],
        "scanwatch_other_ms_per_instance": [
            round(opts.associations * 1000 / rate - m, 2)
            for rate, m in zip(scanwatch_rates, store_ms, strict=True)
        ],
        "stalls_per_round": windows,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
