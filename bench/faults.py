"""The fault table (issue 19, point 1): one row per fault, every instance counted.

Starts the whole development stack (Kafka in a network namespace of its own behind a veth
pair, the model server, the FHIR API on a real PostgreSQL, two inference workers, the listener
with its store on a tmpfs of its own), then, for each
fault in turn, streams ``--studies`` studies of ``--instances`` instances with dcmtk
``storescu`` (each study its own patient) while the fault fires mid-association, waits for the
pipeline to settle and counts (``devtools.faults``: what each column means). Prints the table
and writes ``bench/faults.md``. Root only (the tmpfs mount).

    .venv/bin/python bench/faults.py                       # the full run: 40 × 38 per row
    .venv/bin/python bench/faults.py --studies 6 --instances 38 --faults broker-kill disk-full

Rows share one stack (each its own patients): a row starts once the previous one has settled.
Exits non-zero when a row lost or duplicated anything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools.benchmarks import commit  # noqa: E402
from devtools.faults import (  # noqa: E402
    COLUMNS,
    FAULTS,
    BrokerNetwork,
    Row,
    build_studies,
    can_mount,
    row_cells,
    run_row,
    tmpfs,
)
from devtools.kafka_local import free_port  # noqa: E402
from devtools.postgres_local import LocalPostgres  # noqa: E402
from devtools.stack import Ports, Stack, StackConfig  # noqa: E402

KAFKA_LIBS = ROOT / "var" / "kafka" / "libs"
REPORT = ROOT / "bench" / "faults.md"
MIN_FREE_BYTES = 16 * 2**20


def table(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return f"{os.cpu_count()} CPUs, load average {load}"


def report(
    args: argparse.Namespace, rows: list[Row], started: str, revision: str, load_before: str
) -> str:
    command = ".venv/bin/python bench/faults.py " + shlex.join(sys.argv[1:])
    full = args.studies >= 40 and args.instances >= 38
    problems = [f"- `{r.fault}`: " + "; ".join(r.problems) for r in rows if r.problems]
    details = [f"- `{r.fault}`: {r.detail}" for r in rows if r.detail]
    descriptions = [f"- `{r.fault}`: {FAULTS[r.fault].description}" for r in rows]
    return "\n".join(
        [
            "# Fault table (issue 19, point 1)",
            "",
            "```sh",
            command.strip(),
            "```",
            "",
            f"{started}, commit {revision}; machine: {load_before} at the start, "
            f"{machine()} at the end.",
            f"Each row: {args.studies} studies of {args.instances} instances sent with storescu, "
            "one association per study, each study its own patient"
            + ("" if full else " (**smaller than the full run of 40 × 38**)")
            + f"; two inference workers; quiet period {args.quiet_period:g} s; outages held "
            f"{args.hold:g} s; the FHIR API on PostgreSQL; the store on a {args.store_mb} MiB "
            "tmpfs; the broker in a network namespace of its own, reached through a veth pair "
            "(every row, so that the network row can cut it).",
            "",
            table(rows),
            "",
            "Faults:",
            *descriptions,
            "",
            "Columns (`devtools/faults.py` has the definitions): acked = instances storescu saw "
            "answered Success; resent = instances sent again after a broken association or a "
            "failure status; refused = failure statuses answered; stored = acked instances in "
            "the store; events / distinct = `dicom.instance.received.v1` records and distinct "
            "SOPInstanceUIDs; scored = studies with a result covering every acked instance; "
            "rescored = further results of a complete study (same probabilities: harmless); "
            "partial = results on part of a study (the quiet period passed before the rest "
            "arrived; the Observation is then amended: obs_versions above observations); "
            "observations = FHIR Observations of the row's patients; obs_versions = their "
            "summed versionId; reissued = Observation versions whose result is the previous "
            "version's (counted as duplicated); associations = storescu runs; "
            "dead_letters = records on "
            "any `.dlq` keyed by a row's study; lost = acked instances missing from the store, "
            "the events, the scoring or FHIR; duplicated = a second Observation per (study, "
            "version) or a rescoring that changed the result; fault_s = how long the fault "
            "lasted (until the component was healthy again); recover_s = from the later of the "
            "fault's end and the last acknowledgement to every study scored and no consumer "
            "lag (the `none` row: the same figure undisturbed).",
            "",
            *(["Notes:", *details, ""] if details else []),
            *(
                ["Problems:", *problems, ""]
                if problems
                else ["Every row: 0 lost, 0 duplicated.", ""]
            ),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--instances", type=int, default=38)
    parser.add_argument(
        "--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS), metavar="FAULT"
    )
    parser.add_argument("--hold", type=float, default=30.0, help="outage length (s)")
    parser.add_argument("--quiet-period", type=float, default=5.0)
    parser.add_argument("--store-mb", type=int, default=0, help="tmpfs size; 0: from the run")
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C: the stack, PostgreSQL, the tmpfs and the network
    # namespace are cleaned up on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not can_mount():
        parser.error("mounts a tmpfs as the store: run it as root")
    # Every row's instances (about 95 kB each) and their heatmaps, and room to fill.
    args.store_mb = args.store_mb or max(
        128, int(len(args.faults) * args.studies * args.instances * 0.2) + 64
    )
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = machine()
    # Before the first row is written: the report, rewritten after each row, would mark it dirty.
    revision = commit()
    from training.default_model import ensure_default_model

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="scanwatch-faults-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # PostgreSQL runs as its own user (devtools.postgres_local)
        ensure_default_model(work / "models")
        network = BrokerNetwork()
        network.create()
        postgres = LocalPostgres(work / "pg", free_port())
        (work / "pg").mkdir()
        postgres.start()
        config = StackConfig(
            var=work / "var",
            ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
            workers=2,
            quiet_period_s=args.quiet_period,
            extra_env={"SCANWATCH_LISTENER_MIN_FREE_DISK_BYTES": str(MIN_FREE_BYTES)},
            models=work / "models",
            kafka_libs=KAFKA_LIBS,
            fhir_database_url=postgres.database_url(),
            kafka_host=network.host,
            kafka_netns=network.name,
        )
        try:
            with tmpfs(config.var / "store", args.store_mb):
                stack = Stack(config)
                try:
                    stack.start(timeout=600)
                    for name in args.faults:
                        t0 = time.monotonic()
                        studies = build_studies(
                            work / "studies" / name,
                            f"SW-FAULTS-{name}",
                            args.studies,
                            args.instances,
                        )
                        row = run_row(
                            stack,
                            FAULTS[name],
                            studies,
                            postgres=postgres,
                            network=network,
                            hold_s=args.hold,
                            settle_timeout_s=args.settle_timeout,
                        )
                        rows.append(row)
                        print(  # noqa: T201 - a benchmark's output
                            f"{name}: {dict(zip(COLUMNS, row_cells(row), strict=True))} "
                            f"problems={row.problems} ({time.monotonic() - t0:.0f} s)",
                            flush=True,
                        )
                        args.out.write_text(
                            report(args, rows, started, revision, load_before) + "\n"
                        )
                finally:
                    stack.stop()
        finally:
            postgres.stop()
            network.delete()
    print(table(rows))  # noqa: T201
    print(f"written: {args.out}")  # noqa: T201
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
