"""End-to-end latency: last instance received → Observation queryable (DESIGN §8).

Starts the whole development stack (real Kafka, listener, worker, model server, FHIR API) on
free ports in a temporary folder, sends ``--studies`` sample MR studies one after another with
dcmtk's storescu, and for each measures the time from storescu's return (the last instance was
acknowledged) until the Observation is returned by a FHIR search. The quiet period is reported
separately and subtracted; the worker's own log gives the model (Predict) time per study.

    .venv/bin/python bench/e2e_latency.py --studies 10 --slices 38 --quiet-period 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.kafka_local import free_port  # noqa: E402
from devtools.peers import storescu  # noqa: E402
from devtools.stack import Ports, Stack, StackConfig  # noqa: E402
from scanwatch import ids  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--studies", type=int, default=10)
    args.add_argument("--slices", type=int, default=38)
    args.add_argument("--quiet-period", type=float, default=1.0)
    opts = args.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp)
        config = StackConfig(
            var=var,
            ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
            quiet_period_s=opts.quiet_period,
            models=ROOT / "var" / "models",
            kafka_libs=ROOT / "var" / "kafka" / "libs",
        )
        stack = Stack(config)
        stack.start()
        totals: list[float] = []
        try:
            for n in range(opts.studies):
                patient = f"SW-BENCH-{n:04d}"
                files = build_mr_study(
                    var / "in" / patient, patient_id=patient, n_slices=opts.slices
                )
                storescu(files, "127.0.0.1", config.ports.dicom, called_ae=config.ae_title)
                sent = time.monotonic()
                url = f"{config.fhir_base}/Observation"
                params = {"patient": ids.patient_id(None, patient)}
                headers = stack.fhir_headers()
                while not httpx.get(url, params=params, headers=headers).json().get("total"):
                    if time.monotonic() - sent > 300:
                        raise SystemExit(f"study {n}: no Observation after 300 s")
                    time.sleep(0.02)
                totals.append(time.monotonic() - sent)
        finally:
            stack.stop()
        predict = [
            entry["predict_s"]
            for line in (var / "logs" / "inference-worker.log").read_text().splitlines()
            if line.startswith("{") and (entry := json.loads(line)).get("msg") == "study scored"
        ]

    beyond = [t - opts.quiet_period for t in totals]
    report = {
        "studies": opts.studies,
        "slices_per_study": opts.slices,
        "quiet_period_s": opts.quiet_period,
        "total_s_p50": round(statistics.median(totals), 3),
        "total_s_p95": round(percentile(totals, 95), 3),
        "beyond_quiet_s_p50": round(statistics.median(beyond), 3),
        "beyond_quiet_s_p95": round(percentile(beyond, 95), 3),
        "predict_s_p50": round(statistics.median(predict), 3) if predict else None,
        "predict_s_p95": round(percentile(predict, 95), 3) if predict else None,
    }
    if predict:
        overhead = [b - p for b, p in zip(beyond, predict, strict=False)]
        report["beyond_quiet_minus_predict_s_p95"] = round(percentile(overhead, 95), 3)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
