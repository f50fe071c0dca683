"""The worker's time per 160-slice study, stage by stage (issue 18: "worker time per 160-slice
study: report it").

    .venv/bin/python bench/study_scoring.py [--slices 160] [--rounds 3] [--engine tensorflow]
        [--model-dir training/default_model/saved_model | --image-size N] [--batch 16]

One synthetic axial MR series of ``--slices`` slices (the bundled MNI152 sample,
``scanwatch.sample.build_mr_study``, at half its slice spacing: each sample slice is written a
second time half-way to the next, with its own SOPInstanceUID and position), in the listener's
file-store layout. A real model server (``services.model_server``, its own process, as deployed)
serves the shipped default model; the worker's own code does the rest, in this process:

* **headers**: one read per instance (``pydicom``, the pixel data left in the file);
* **select**: the series and the slices to score (``slices_to_score``: every slice by default);
* **decode+preprocess**: the scored instances' pixel data read from the file and decoded, once
  per instance, by the dataset their header came from; ``scanwatch.imaging`` at the model's
  size (timed as ``select_series``, which is all three, less the two above);
* **predict**: ``ModelClient.predict`` over gRPC, in batches of ``--batch`` (wall time: the
  server's work; CPU: this process's share, the requests and answers);
* **study rule**: ``inference_worker.scoring.study_of`` (``scanwatch.study_score``);
* **fhir build**: the study's FHIR resources (``fhir_resources.all_resources_for``);
* **saliency** and **heatmap series**: the heatmaps' Predict and their DICOM series, which the
  worker does after the score is written (not on the score's path, but the same study's work).

Each stage runs ``--rounds`` times after one warm-up; printed: the median wall time and the
median CPU time of this process (``time.process_time``, every thread's). The machine's cores
are shared with other engineers: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.kafka_local import free_port  # noqa: E402
from devtools.stack import model_available  # noqa: E402
from devtools.testing import wait_for  # noqa: E402
from inference_worker import fhir_resources, heatmaps, series  # noqa: E402
from inference_worker.adapters.tf_serving import ModelClient  # noqa: E402
from inference_worker.scoring import received_study, scored_study, study_of  # noqa: E402
from scanwatch import store_layout  # noqa: E402
from scanwatch.model_repository import DEFAULT_MODEL_NAME  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402
from schemas import InstanceRef, StudyReadyV1  # noqa: E402

DEFAULT_MODEL = ROOT / "training" / "default_model" / "saved_model"


def out(*parts: object) -> None:
    """One line to stdout (benchmarks report there; ``print`` is banned by the linter)."""
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def timed(call: Callable[[], Any], rounds: int) -> tuple[float, float, Any]:
    """Median (wall ms, CPU ms) of ``rounds`` calls after one warm-up, and the last result."""
    result = call()
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        result = call()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus), result


def stored_study(folder: Path, slices: int) -> list[InstanceRef]:
    """A ``slices``-slice axial series in the file store's layout (see the module docstring)."""
    sources = build_mr_study(folder / "sent", patient_id="SW-BENCH-160", n_slices=(slices + 1) // 2)
    refs: list[InstanceRef] = []
    datasets = [pydicom.dcmread(p) for p in sources]
    step = float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2])
    number = 0
    for ds in datasets:
        for half in (0, 1):
            if number == slices:
                break
            number += 1
            copy = ds.copy()
            copy.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, str(number)])
            copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
            copy.InstanceNumber = number
            z = float(ds.ImagePositionPatient[2]) + half * step / 2
            copy.ImagePositionPatient = [*ds.ImagePositionPatient[:2], f"{z:g}"]
            copy.SliceLocation = f"{z:g}"
            copy.SliceThickness = f"{abs(step) / 2:g}"
            copy.SpacingBetweenSlices = f"{abs(step) / 2:g}"
            target = store_layout.instance_path(
                folder / "store", ds.StudyInstanceUID, ds.SeriesInstanceUID, copy.SOPInstanceUID
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            copy.save_as(target, enforce_file_format=True)
            refs.append(
                InstanceRef(
                    SeriesInstanceUID=ds.SeriesInstanceUID,
                    SOPInstanceUID=copy.SOPInstanceUID,
                    SOPClassUID=ds.SOPClassUID,
                    storage_uri=target.resolve().as_uri(),
                    sha256=hashlib.sha256(target.read_bytes()).hexdigest(),
                )
            )
    return refs


def publish_resized(repository: Path, size: int) -> None:
    """The shipped model's weights built for ``size``² inputs, published as version 1."""
    from training.default_model import SHIPPED, SHIPPED_REPORT, load_shipped_classifier
    from training.export import export_saved_model

    report = json.loads((SHIPPED / SHIPPED_REPORT).read_text())
    model = load_shipped_classifier(image_size=size)
    export_saved_model(model, report["class_names"], 0.5, repository, DEFAULT_MODEL_NAME, 1)


def model_server(repository: Path, engine: str, cache: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH": str(repository),
        "SCANWATCH_MODEL_SERVER_MODEL_NAME": DEFAULT_MODEL_NAME,
        "SCANWATCH_MODEL_SERVER_PORT": str(port),
        "SCANWATCH_MODEL_SERVER_METRICS_PORT": "0",
        "SCANWATCH_MODEL_SERVER_ENGINE": engine,
        "SCANWATCH_MODEL_SERVER_OPENVINO_CACHE_DIR": str(cache),
        "SCANWATCH_MODEL_SERVER_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.model_server"], env=env)
    target = f"127.0.0.1:{port}"

    def available() -> bool:
        if proc.poll() is not None:
            raise SystemExit("the model server exited")
        return model_available(target, DEFAULT_MODEL_NAME)

    wait_for(available, 300, "the model server to serve the default model")
    return proc, target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--slices", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--engine", choices=["tensorflow", "openvino"], default="tensorflow")
    parser.add_argument(
        "--image-size",
        type=int,
        help="serve the shipped model's weights at this input size instead of --model-dir "
        "(issue 18 point 7: what a larger input costs; its scores mean nothing)",
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-study-"))
    proc = None
    try:
        out("load average before:", os.getloadavg())
        refs = stored_study(work, args.slices)
        repository = work / "models"
        if args.image_size:
            publish_resized(repository, args.image_size)
        else:
            shutil.copytree(args.model_dir, repository / DEFAULT_MODEL_NAME / "1")
        proc, target = model_server(repository, args.engine, work / "openvino-cache")
        loop = asyncio.new_event_loop()
        client = ModelClient(target, DEFAULT_MODEL_NAME, batch_size=args.batch)
        size = loop.run_until_complete(client.check_signature())
        rules = series.SelectionRules()
        figures: dict[str, tuple[float, float]] = {}

        def stage(name: str, call: Callable[[], Any]) -> Any:
            wall, cpu, result = timed(call, args.rounds)
            figures[name] = (wall, cpu)
            return result

        # The stages of select_series, one by one (its private parts: this is its benchmark).
        read = stage("headers", lambda: [series._read(r) for r in refs])
        frames = [f for r, (h, _) in zip(refs, read, strict=True) for f in series._frames_of(r, h)]
        stage("select", lambda: series.slices_to_score(frames, rules.max_gap_mm))
        selected = stage("select_series", lambda: series.select_series(refs, size))
        # A dataset keeps the pixels it has read: this stage is select_series less the others.
        figures["decode+preprocess"] = (
            figures["select_series"][0] - figures["headers"][0] - figures["select"][0],
            figures["select_series"][1] - figures["headers"][1] - figures["select"][1],
        )
        figures["select_series"] = figures.pop("select_series")  # printed after its parts
        prediction = stage(
            "predict", lambda: loop.run_until_complete(client.predict(selected.images))
        )
        result = stage("study rule", lambda: study_of(prediction))
        ready = StudyReadyV1(
            StudyInstanceUID=str(
                pydicom.dcmread(series.path_of(refs[0].storage_uri)).StudyInstanceUID
            ),
            instances=refs,
            first_received_at=datetime(2026, 1, 1, tzinfo=UTC),
            last_received_at=datetime(2026, 1, 1, tzinfo=UTC),
            quiet_period_s=1,
        )
        stage(
            "fhir build",
            lambda: fhir_resources.all_resources_for(
                scored_study(
                    ready, received_study(ready, selected), prediction, result, selected.slices
                )
            ),
        )
        saliency = stage(
            "saliency predict",
            lambda: loop.run_until_complete(
                client.explain(selected.images, prediction.model_version)
            ),
        )
        rounds = iter(range(10_000))
        stage(
            "heatmap series",
            lambda: heatmaps.write_heatmap_series(
                work / f"heatmaps-{next(rounds)}",  # a fresh root: a stored series is kept
                ready.StudyInstanceUID,
                selected.slices,
                saliency.heatmaps,
                prediction.probabilities,
                prediction.class_names,
                prediction.model_name,
                prediction.model_version,
                ready.occurred_at,
            ),
        )
        loop.run_until_complete(client.close())
        loop.close()

        score_path = ("select_series", "predict", "study rule", "fhir build")
        out(
            f"\nstudy: {len(selected.images)} of {args.slices} slices scored at {size}², "
            f"model {'the shipped weights resized' if args.image_size else args.model_dir.name} "
            f"on {args.engine}, batch {args.batch}, "
            f"median of {args.rounds} rounds"
        )
        out(f"{'stage':<28}{'wall ms':>10}{'CPU ms':>10}")
        for name, (wall, cpu) in figures.items():
            out(f"{name:<28}{wall:>10.1f}{cpu:>10.1f}")
        wall = sum(figures[n][0] for n in score_path)
        cpu = sum(figures[n][1] for n in score_path)
        out(f"{'score path (sum)':<28}{wall:>10.1f}{cpu:>10.1f}")
        heat = [figures[n] for n in ("saliency predict", "heatmap series")]
        wall, cpu = sum(w for w, _ in heat), sum(c for _, c in heat)
        out(f"{'heatmaps (sum)':<28}{wall:>10.1f}{cpu:>10.1f}")
        out("load average after:", os.getloadavg())
        out(json.dumps({"slices": args.slices, "engine": args.engine, "stages_ms": figures}))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
