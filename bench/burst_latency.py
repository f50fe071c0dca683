"""Latency under load (issue 20, point 5): does the first study's result wait behind a burst?

Starts the whole development stack (real Kafka, listener, worker, model server, FHIR API) and,
for each round, measures one study's latency (storescu returned → its Observation returned by a
FHIR search) twice: sent alone, and sent just before a burst of ``--burst`` other studies (each
its own storescu, all at once, started as the first one's returns). The burst's own latencies
and the order in which the worker scored the studies (from its log) are reported too.

    .venv/bin/python bench/burst_latency.py --burst 10 --rounds 3 --slices 38 --quiet-period 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.benchmarks import add_scoring_nice, percentile, stack_config  # noqa: E402
from devtools.peers import storescu  # noqa: E402
from devtools.stack import Stack  # noqa: E402
from scanwatch import ids  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402


class Bench:
    def __init__(self, stack: Stack, var: Path, slices: int) -> None:
        self.stack, self.var, self.slices = stack, var, slices
        self.config = stack.config
        # One connection for every poll (wait_scored runs on the main thread only): a new one
        # per request, every 20 ms, cost the machine CPU the stack was being measured on.
        self.http = httpx.Client()

    def study(self, name: str) -> list[Path]:
        return build_mr_study(self.var / "in" / name, patient_id=name, n_slices=self.slices)

    def send(self, files: list[Path]) -> float:
        storescu(files, "127.0.0.1", self.config.ports.dicom, called_ae=self.config.ae_title)
        return time.monotonic()

    def send_into(self, sent_at: dict[str, float], name: str, files: list[Path]) -> None:
        sent_at[name] = self.send(files)

    def wait_scored(self, name: str, since: float) -> float:
        url = f"{self.config.fhir_base}/Observation"
        params = {"patient": ids.patient_id(None, name)}
        headers = self.stack.fhir_headers()
        while not self.http.get(url, params=params, headers=headers).json().get("total"):
            if time.monotonic() - since > 600:
                raise SystemExit(f"{name}: no Observation after 600 s")
            time.sleep(0.02)
        return time.monotonic() - since


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--burst", type=int, default=10)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--slices", type=int, default=38)
    args.add_argument("--quiet-period", type=float, default=1.0)
    add_scoring_nice(args)
    opts = args.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp)
        config = stack_config(var, quiet_period_s=opts.quiet_period, scoring_nice=opts.scoring_nice)
        stack = Stack(config)
        stack.start()
        bench = Bench(stack, var, opts.slices)
        alone: list[float] = []
        first: list[float] = []
        burst: list[float] = []
        try:
            warm = bench.study("SW-BURST-WARM")
            bench.wait_scored("SW-BURST-WARM", bench.send(warm))
            for r in range(opts.rounds):
                name = f"SW-BURST-{r}-ALONE"
                alone.append(bench.wait_scored(name, bench.send(bench.study(name))))
                lead = f"SW-BURST-{r}-FIRST"
                lead_files = bench.study(lead)
                others = {f"SW-BURST-{r}-{n:02d}": [] for n in range(opts.burst)}
                for other in others:
                    others[other] = bench.study(other)
                sent_at: dict[str, float] = {}
                started = bench.send(lead_files)
                senders = [
                    threading.Thread(target=bench.send_into, args=(sent_at, n, f))
                    for n, f in others.items()
                ]
                for thread in senders:
                    thread.start()
                first.append(bench.wait_scored(lead, started))
                for thread in senders:
                    thread.join()
                for other in others:
                    burst.append(bench.wait_scored(other, sent_at[other]))
        finally:
            bench.http.close()
            stack.stop()
        order = [
            entry["StudyInstanceUID"]
            for line in (var / "logs" / "inference-worker.log").read_text().splitlines()
            if line.startswith("{") and (entry := json.loads(line)).get("msg") == "study scored"
        ]

    report = {
        "burst": opts.burst,
        "rounds": opts.rounds,
        "slices_per_study": opts.slices,
        "quiet_period_s": opts.quiet_period,
        "scoring_nice": opts.scoring_nice,
        "alone_s_median": round(statistics.median(alone), 3),
        "first_before_burst_s_median": round(statistics.median(first), 3),
        "first_before_burst_s_max": round(max(first), 3),
        "burst_s_p50": round(statistics.median(burst), 3),
        "burst_s_p95": round(percentile(burst, 95), 3),
        "studies_scored": len(order),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
