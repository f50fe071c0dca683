"""The heatmap's cost per study, against the Predict time of the same study, on both engines.

    .venv/bin/python bench/heatmap.py [--model-dir training/default_model/saved_model]
        [--slices 16] [--rounds 7] [--engines tensorflow openvino]

One study: the bundled MNI152 sample (``scanwatch.sample.build_mr_study``) with ``--slices``
slices (16: the worker's old ``max_slices``; it now scores every slice, see
``bench/study_scoring.py`` for a 160-slice study), stored in the listener's layout and preprocessed
by ``scanwatch.imaging.preprocess_slice`` at the model's size, as the worker scores it. Per
engine (the model server's own engines, loaded in this process, so that the figures are the
model's work and not gRPC's, which is the same for both signatures):

* **predict**: ``serving_default`` on the study's slices (what scoring costs);
* **saliency**: the ``saliency`` signature on the same slices (Grad-CAM + probabilities);
* **dicom**: building and writing the heatmap series (``inference_worker.heatmaps``: one
  Secondary Capture per slice, highdicom's for the first slice and derived from it for the
  others; durable writes; engine-independent), into a fresh folder.

Each is run ``--rounds`` times after one warm-up; printed: the median wall time and the median
CPU time of this process (``time.process_time``: every thread's, so a multi-threaded engine's
CPU can exceed its wall time), and the heatmap's cost (saliency + dicom) relative to predict.
The machine's cores are shared with other engineers: the load average is printed before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference_worker import heatmaps  # noqa: E402
from inference_worker.series import SourceSlice  # noqa: E402
from scanwatch import store_layout  # noqa: E402
from scanwatch.imaging import preprocess_slice  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402
from schemas.model_signature import HEATMAPS, SALIENCY_SIGNATURE_NAME, SIGNATURE_NAME  # noqa: E402

DEFAULT_MODEL = ROOT / "training" / "default_model" / "saved_model"


def out(*parts: object) -> None:
    """One line to stdout (benchmarks report there; ``print`` is banned by the linter)."""
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def timed(call: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median (wall ms, CPU ms) of ``rounds`` calls after one warm-up."""
    call()
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def stored_study(folder: Path, slices: int) -> list[Path]:
    """The sample study copied into the file store's layout."""
    paths = []
    for source in build_mr_study(folder / "sent", n_slices=slices):
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        target = store_layout.instance_path(
            folder / "store", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        paths.append(target)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engines", nargs="+", default=["tensorflow", "openvino"])
    args = parser.parse_args(argv)

    from services.model_server.engine import TensorFlowEngine
    from services.model_server.openvino_engine import OpenVINOEngine

    work = Path(tempfile.mkdtemp(prefix="bench-heatmap-"))
    try:
        out("load average before:", os.getloadavg())
        paths = stored_study(work, args.slices)
        datasets = [pydicom.dcmread(p) for p in paths]
        engines = {
            "tensorflow": lambda: TensorFlowEngine(),
            "openvino": lambda: OpenVINOEngine(work / "openvino-cache"),
        }
        results: dict[str, dict[str, list[float]]] = {}
        maps = None
        size = 0
        for name in args.engines:
            servable = engines[name]().load(args.model_dir)
            spec = servable.signature_defs[SIGNATURE_NAME].inputs["images"].tensor_shape
            size = spec.dim[1].size
            images = np.stack(
                [
                    preprocess_slice(
                        ds.pixel_array,
                        size,
                        float(ds.get("RescaleSlope", 1.0)),
                        float(ds.get("RescaleIntercept", 0.0)),
                    )
                    for ds in datasets
                ]
            )
            inputs = {"images": images}
            predict = timed(
                lambda s=servable, i=inputs: s.run(SIGNATURE_NAME, i, ["probabilities"]),
                args.rounds,
            )
            saliency = timed(
                lambda s=servable, i=inputs: s.run(
                    SALIENCY_SIGNATURE_NAME, i, [HEATMAPS, "probabilities"]
                ),
                args.rounds,
            )
            maps = servable.run(SALIENCY_SIGNATURE_NAME, inputs, [HEATMAPS, "probabilities"])
            results[name] = {"predict_ms": list(predict), "saliency_ms": list(saliency)}

        assert maps is not None
        sources = [
            SourceSlice(str(ds.SOPInstanceUID), p, None)
            for ds, p in zip(datasets, paths, strict=True)
        ]
        study = str(datasets[0].StudyInstanceUID)
        round_number = iter(range(10_000))

        def write_series() -> None:
            # A fresh store root per call: an existing series is (rightly) not written again.
            root = work / f"heatmaps-{next(round_number)}"
            heatmaps.write_heatmap_series(
                root,
                study,
                sources,
                maps[HEATMAPS],
                maps["probabilities"],
                ["normal", "mass", "bleed", "infarct"],
                "bench",
                1,
                datetime(2026, 1, 1, tzinfo=UTC),
            )

        dicom = timed(write_series, args.rounds)
        out(f"study: {args.slices} slices at {size}², model {args.model_dir}")
        out(f"heatmap DICOM series (build + durable write): wall {dicom[0]:.1f} ms, "
            f"CPU {dicom[1]:.1f} ms")  # fmt: skip
        for name, figures in results.items():
            (pw, pc), (sw, sc) = figures["predict_ms"], figures["saliency_ms"]
            out(
                f"{name:>10}: predict wall {pw:.1f} ms (CPU {pc:.1f}); saliency wall {sw:.1f} ms "
                f"(CPU {sc:.1f}); heatmap (saliency + DICOM) / predict: wall "
                f"{(sw + dicom[0]) / pw:.2f}x, CPU {(sc + dicom[1]) / pc:.2f}x"
            )
        out("load average after:", os.getloadavg())
        out(json.dumps({"slices": args.slices, "dicom_ms": list(dicom), **results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
