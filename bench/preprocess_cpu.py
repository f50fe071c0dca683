"""The worker's image preprocessing: CPU per 38-slice MR study (issue 20's pixel part).

    .venv/bin/python bench/preprocess_cpu.py [--sizes 128 224] [--rounds 7] [--loops 20]
        [--before REV]

One synthetic axial MR study (``scanwatch.sample.build_mr_study``: 38 slices of 233 x 197
uint16, slope 1, intercept 0), its ``pixel_array`` s preprocessed at each model size:

* **per slice**: ``preprocess_grey`` on each slice, as ``inference_worker.pixels`` calls it;
* **stack**: ``preprocess_grey_stack`` on the whole study in one call;
* **before** (with ``--before REV``): ``preprocess_grey`` of ``scanwatch/imaging.py`` as it was
  at git revision ``REV``, loaded from git in this process, so both are measured in the same run
  on the same load.

CPU per study (``time.process_time``, ``--loops`` studies a round, the variants taking turns):
the minimum and median of ``--rounds`` rounds. Also printed: the largest difference from the
float64 reference steps (``imaging.reference_grey``) and whether the stack equals the per-slice
images to the bit. The cores are shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.benchmarks import say  # noqa: E402
from scanwatch import imaging  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402


def study_pixels() -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        paths = build_mr_study(Path(folder), seed=1)
        return np.stack([pydicom.dcmread(path).pixel_array for path in paths])


def module_at(revision: str) -> types.ModuleType:
    """``scanwatch/imaging.py`` as it was at ``revision``, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:scanwatch/imaging.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"imaging_at_{revision}")
    exec(compile(source, f"{revision}:scanwatch/imaging.py", "exec"), module.__dict__)  # noqa: S102
    return module


def each_slice(preprocess: Callable[..., np.ndarray], slices: list[np.ndarray], size: int) -> None:
    for stored in slices:
        preprocess(stored, size)


def cpu_ms(
    variants: list[tuple[str, Callable[[], object]]], rounds: int, loops: int
) -> dict[str, list[float]]:
    """CPU milliseconds of one call of each variant, ``rounds`` rounds of ``loops`` calls,
    the variants taking turns within each round (so that a change in the machine's load
    falls on all of them)."""
    for _, work in variants:
        work()
    per_round: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, work in variants:
            started = time.process_time()
            for _ in range(loops):
                work()
            per_round[name].append((time.process_time() - started) / loops * 1000)
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--before", help="a git revision whose preprocess_grey to time too")
    args = parser.parse_args()
    stack = study_pixels()
    say(f"study: {stack.shape[0]} slices of {stack.shape[1]}x{stack.shape[2]} {stack.dtype}")
    say(f"load average before: {os.getloadavg()}")
    before = module_at(args.before) if args.before else None
    for size in args.sizes:
        slices = list(stack)
        per_slice = np.stack([imaging.preprocess_grey(s, size) for s in slices])
        stacked = imaging.preprocess_grey_stack(stack, size)
        expected = np.stack([imaging.reference_grey(s, size) for s in slices])
        difference = float(np.abs(per_slice.astype(np.float64) - expected).max())
        ulp = float(np.spacing(np.float32(255)))
        say(
            f"size {size}: max |new - float64 reference| {difference:.3g} ({difference / ulp:.0f}"
            f" ulp of 255); stack == per slice: {np.array_equal(stacked, per_slice)}"
        )
        timings: list[tuple[str, Callable[[], object]]] = []
        if before is not None:
            old = functools.partial(each_slice, before.preprocess_grey, slices, size)
            timings.append((f"before ({args.before})", old))
        timings.append(
            ("per slice", functools.partial(each_slice, imaging.preprocess_grey, slices, size))
        )
        timings.append(("stack", functools.partial(imaging.preprocess_grey_stack, stack, size)))
        for name, times in cpu_ms(timings, args.rounds, args.loops).items():
            say(
                f"  {name:>24}: {min(times):6.2f} ms CPU per study"
                f" (median {statistics.median(times):.2f})"
            )
    say(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
