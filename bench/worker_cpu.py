"""The worker's CPU per 38-instance study, Predict excluded (issue 20's bar: ≤ 25 ms).

    .venv/bin/python bench/worker_cpu.py [--studies 30] [--slices 38] [--decode-processes 0]
        [--engine openvino] [--batch 16]

``--studies`` synthetic 38-instance axial MR studies (``scanwatch.sample.build_mr_study``, one
seed each) are scored one after the other by the worker's own :class:`Scorer`, in this
process, against real peers in their own processes, as deployed: the model server serving the
shipped default model and the FHIR API (tokens required, SQLite). Heatmaps are off: they are
computed after the result is written (``bench/heatmap.py`` measures them).

Per study, the CPU of the whole ``Scorer.score`` (``time.process_time``: every thread of this
process) plus that of the pixel pool's processes (``/proc/<pid>/stat``, user + system: they
are not this process's children once the pool is started by a forkserver, so
``RUSAGE_CHILDREN`` would not see them), less the worker's own CPU for its Predict calls
(gRPC request and answer), measured alone on the same images in the same run (median of
``--studies`` calls; it cannot be cut out of ``score`` itself, where the registered record's
FHIR write runs during Predict). Printed: median and p95 per study, the Predict CPU taken
out, the wall time, and the load average before and after (the cores are shared).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from fhir_writes import CLIENT, SECRET, fhir_api  # noqa: E402
from study_scoring import DEFAULT_MODEL, model_server  # noqa: E402

from devtools.benchmarks import percentile, say  # noqa: E402
from devtools.process_stats import snapshot  # noqa: E402
from inference_worker import series  # noqa: E402
from inference_worker.adapters.fhir_writer import FhirWriter  # noqa: E402
from inference_worker.adapters.tf_serving import ModelClient, TfServingModel  # noqa: E402
from inference_worker.scoring import Scorer  # noqa: E402
from scanwatch.model_repository import DEFAULT_MODEL_NAME  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402
from schemas import InstanceRef, StudyReadyV1  # noqa: E402


def ready_event(files: list[Path]) -> StudyReadyV1:
    refs = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append(
            InstanceRef(
                SeriesInstanceUID=ds.SeriesInstanceUID,
                SOPInstanceUID=ds.SOPInstanceUID,
                SOPClassUID=ds.SOPClassUID,
                storage_uri=path.resolve().as_uri(),
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        )
    return StudyReadyV1(
        StudyInstanceUID=str(ds.StudyInstanceUID),
        instances=refs,
        first_received_at="2026-01-01T00:00:00Z",
        last_received_at="2026-01-01T00:00:01Z",
        quiet_period_s=1,
    )


def process_cpu(pids: list[int]) -> float:
    """User + system seconds of ``pids`` so far (processes gone count as 0)."""
    procs = snapshot()
    return sum(procs[pid].cpu_s for pid in pids if pid in procs)


async def measure(args: argparse.Namespace, target: str, fhir: str, studies: list[Any]) -> dict:
    client = ModelClient(target, DEFAULT_MODEL_NAME, batch_size=args.batch)
    model = TfServingModel(client)
    writer = FhirWriter(fhir, client_id=CLIENT, client_secret=SECRET)
    options: dict[str, Any] = {"retries": 0, "heatmaps": False}
    pool = None
    if "pixels" in inspect.signature(Scorer).parameters:  # absent before issue 20's pool
        from inference_worker.pixels import PixelPool

        pool = PixelPool(args.decode_processes)
        options["pixels"] = pool
    elif args.decode_processes > 1:
        raise SystemExit("this tree has no pixel pool")
    scorer = Scorer(model, writer, **options)
    size = await client.check_signature()
    try:
        for ready in studies[:2]:  # warm-up: token, connections, pool processes, imports
            await scorer.score(ready)
        pids = pool.pids() if pool is not None else []
        cpus, walls = [], []
        for ready in studies[2:]:
            pool_cpu = process_cpu(pids)
            cpu, wall = time.process_time(), time.perf_counter()
            await scorer.score(ready)
            cpus.append(time.process_time() - cpu + process_cpu(pids) - pool_cpu)
            walls.append(time.perf_counter() - wall)
        # The worker's share of Predict, alone: the same images, the same client.
        images = series.select_series(list(studies[2].instances), size).images
        predict_cpus = []
        for _ in studies[2:]:
            cpu = time.process_time()
            await model.predict(images)
            predict_cpus.append(time.process_time() - cpu)
    finally:
        if pool is not None:
            pool.close()
        await writer.close()
        await client.close()
    predict = statistics.median(predict_cpus)
    less_predict = [c - predict for c in cpus]
    return {
        "studies": len(cpus),
        "decode_processes": args.decode_processes,
        "pool_processes_measured": len(pids),
        "cpu_ms_less_predict": {
            "median": round(statistics.median(less_predict) * 1000, 1),
            "p95": round(percentile(less_predict, 95) * 1000, 1),
            "min": round(min(less_predict) * 1000, 1),
        },
        "predict_cpu_ms_median": round(predict * 1000, 1),
        "cpu_ms_with_predict_median": round(statistics.median(cpus) * 1000, 1),
        "wall_ms_median": round(statistics.median(walls) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--slices", type=int, default=38)
    parser.add_argument("--decode-processes", type=int, default=0)
    parser.add_argument("--engine", choices=["tensorflow", "openvino"], default="openvino")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    say(f"tree: {ROOT}; load average before: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="bench-worker-cpu-"))
    proc = None
    try:
        studies = [
            ready_event(
                build_mr_study(
                    work / f"s{n}", patient_id=f"SW-CPU-{n:03d}", n_slices=args.slices, seed=n
                )
            )
            for n in range(args.studies + 2)
        ]
        repository = work / "models"
        shutil.copytree(args.model_dir, repository / DEFAULT_MODEL_NAME / "1")
        proc, target = model_server(repository, args.engine, work / "openvino-cache")
        with fhir_api(work, timeout=120) as fhir:
            report = asyncio.run(measure(args, target, fhir, studies))
        report |= {"slices": args.slices, "engine": args.engine, "batch": args.batch}
        say(json.dumps(report))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    say(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
