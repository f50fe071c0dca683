"""End-to-end latency: last instance received → Observation queryable (DESIGN §8).

Starts the whole development stack (real Kafka, listener, worker, model server, FHIR API) on
free ports in a temporary folder, sends ``--studies`` sample MR studies one after another with
dcmtk's storescu, and for each measures the time from storescu's return (the last instance was
acknowledged) until the Observation is returned by a FHIR search. The quiet period is reported
separately and subtracted; the worker's own log gives the model (Predict) time per study.

    .venv/bin/python bench/e2e_latency.py --studies 10 --slices 38 --quiet-period 1 [--mpps]

With ``--mpps``, each study is sent twice in turn, in the same run: once by the timer path above,
and once as a modality reporting its procedure step would (issue 20): MPPS N-CREATE before its
images, N-SET COMPLETED naming them after (pynetdicom), from an AE whose quiet period is 600 s,
so that only the completed step can release the study. The clock starts when storescu returns in
both paths (the MPPS path's includes its N-SET).
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

from devtools.benchmarks import percentile, stack_config  # noqa: E402
from devtools.peers import storescu  # noqa: E402
from devtools.stack import Stack  # noqa: E402
from scanwatch import ids  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402

#: The MPPS path's calling AE and its quiet period (longer than any study takes).
MPPS_SENDER, MPPS_QUIET_S = "MPPSBENCH", 600.0


def send_with_mpps(files: list[Path], port: int, called_ae: str) -> float:
    """Send a study as a modality reporting its procedure step; the time storescu returned."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

    from dicom_listener.tests.test_procedure_steps import completed, in_progress

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    step_uid = pydicom.uid.generate_uid()
    ae = AE(ae_title=MPPS_SENDER)
    ae.add_requested_context(ModalityPerformedProcedureStep)

    def step(send: str, ds: pydicom.Dataset) -> None:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        try:
            status, _ = getattr(assoc, send)(ds, ModalityPerformedProcedureStep, step_uid)
            if not status or status.Status != 0:
                raise SystemExit(f"{send} refused: {status}")
        finally:
            assoc.release()

    step("send_n_create", in_progress(headers[0].StudyInstanceUID))
    storescu(files, "127.0.0.1", port, called_ae=called_ae, calling_ae=MPPS_SENDER)
    sent = time.monotonic()
    series = {headers[0].SeriesInstanceUID: [h.SOPInstanceUID for h in headers]}
    step("send_n_set", completed(series))
    return sent


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--studies", type=int, default=10)
    args.add_argument("--slices", type=int, default=38)
    args.add_argument("--quiet-period", type=float, default=1.0)
    args.add_argument("--mpps", action="store_true", help="also the MPPS path, in turn")
    opts = args.parse_args()
    paths = ["timer", "mpps"] if opts.mpps else ["timer"]

    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp)
        config = stack_config(
            var,
            quiet_period_s=opts.quiet_period,
            extra_env={
                "SCANWATCH_WORKER_QUIET_PERIOD_BY_SOURCE": json.dumps({MPPS_SENDER: MPPS_QUIET_S})
            },
        )
        stack = Stack(config)
        stack.start()
        totals: dict[str, list[float]] = {path: [] for path in paths}
        studies: dict[str, str] = {}  # StudyInstanceUID -> path
        # One connection for every poll: a new one per request, every 20 ms, cost the machine
        # CPU the stack was being measured on.
        http = httpx.Client()
        try:
            for n in range(opts.studies):
                for path in paths:
                    patient = f"SW-BENCH-{path}-{n:04d}"
                    files = build_mr_study(
                        var / "in" / patient, patient_id=patient, n_slices=opts.slices
                    )
                    studies[_study_uid(files[0])] = path
                    if path == "mpps":
                        sent = send_with_mpps(files, config.ports.dicom, config.ae_title)
                    else:
                        storescu(files, "127.0.0.1", config.ports.dicom, called_ae=config.ae_title)
                        sent = time.monotonic()
                    url = f"{config.fhir_base}/Observation"
                    params = {"patient": ids.patient_id(None, patient)}
                    headers = stack.fhir_headers()
                    while not http.get(url, params=params, headers=headers).json().get("total"):
                        if time.monotonic() - sent > 300:
                            raise SystemExit(f"{path} study {n}: no Observation after 300 s")
                        time.sleep(0.02)
                    totals[path].append(time.monotonic() - sent)
        finally:
            http.close()
            stack.stop()
        predict: dict[str, list[float]] = {path: [] for path in paths}
        for line in (var / "logs" / "inference-worker.log").read_text().splitlines():
            if line.startswith("{") and (entry := json.loads(line)).get("msg") == "study scored":
                predict[studies[entry["StudyInstanceUID"]]].append(entry["predict_s"])

    report: dict[str, object] = {"studies": opts.studies, "slices_per_study": opts.slices}
    for path in paths:
        quiet = opts.quiet_period if path == "timer" else 0.0
        report[path] = summary(totals[path], predict[path], quiet)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def summary(totals: list[float], predict: list[float], quiet: float) -> dict[str, float | None]:
    """Percentiles of one path's latencies, less its quiet period, and of its Predict time."""
    beyond = [t - quiet for t in totals]
    report: dict[str, float | None] = {
        "quiet_period_s": quiet,
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
    return report


if __name__ == "__main__":
    raise SystemExit(main())
