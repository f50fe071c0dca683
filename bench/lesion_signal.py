"""Issue 18 point 7 without training: how much of a lesion's signal survives the model's input
size? The study benchmark's lesions rendered twice, with and without the lesion, with the same
subject, warp and noise, then preprocessed as the worker does (`scanwatch.imaging`) at each
input size. The difference of the two inputs is the lesion's signal as the model receives it;
the noise is the same slice's noisy input less its noise-free one, in the brain.

    nice -n 10 .venv/bin/python bench/lesion_signal.py [--lesions 400] [--sizes 128 224]

Per lesion (its largest cross-section, the middle of its span), per size:

* **peak**: the largest |signal| in input units (0-255) over the noise's standard deviation in
  the brain: what one pixel shows;
* **pixels**: how many input pixels carry it above 3 noise standard deviations: how much of
  its shape the model can see.

Printed: the medians by lesion diameter, and the share of lesions whose peak reaches 5.
The lesions are drawn as the benchmark draws them (`training.study_dataset`: 4-40 mm,
log-uniform; 12-80 % contrast, log-uniform; the four kinds), on the benchmark's own slices.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanwatch.imaging import preprocess_grey  # noqa: E402
from scanwatch.sample import mni152_volume  # noqa: E402

# The benchmark's own renderer, step by step (its private parts: this bench takes it apart to
# render one slice twice with the same noise).
from training.study_dataset import (  # noqa: E402
    DEFAULT,
    TISSUE_LEVEL,
    WEDGE_FROM_MM,
    _draw_lesion,
    _lesion_centre,
    _plant,
    study_levels,
)
from training.synthetic_dataset import _subject, _warp, finish_slice  # noqa: E402

BINS = (4.0, 5.0, 6.0, 8.0, 12.0, 20.0, 41.0)


def one_lesion(volume: np.ndarray, levels: list[int], seed: int, sizes: list[int]) -> dict:
    rng = np.random.default_rng(seed)
    lesion = _draw_lesion(rng, DEFAULT, len(levels))
    subject = _subject(rng)
    middle = lesion.centre_slice + lesion.span // 2
    k = int(np.clip(levels[middle] + subject["level_jitter"], 0, volume.shape[2] - 1))
    image = _warp(volume[:, :, k], rng, subject)
    centre = _lesion_centre(
        rng,
        image > TISSUE_LEVEL,
        lesion.diameter_mm / 2,
        lesion.kind,
        lesion.diameter_mm >= WEDGE_FROM_MM,
    )
    planted = _plant(image, lesion, 1.0, centre, rng)
    state = rng.bit_generator.state

    def finished(picture: np.ndarray, noise: float) -> np.ndarray:
        """``picture`` finished from the same generator state: the same bias field and noise."""
        rng.bit_generator.state = copy.deepcopy(state)
        return finish_slice(picture, rng, {**subject, "noise": noise})

    with_lesion = finished(planted, subject["noise"])
    without = finished(image, subject["noise"])
    clean = finished(image, 0.0)
    out = {"diameter_mm": lesion.diameter_mm, "contrast": abs(lesion.contrast)}
    for size in sizes:
        normal = preprocess_grey(without, size)
        quiet = preprocess_grey(clean, size)
        # The noise in the brain: where the noise-free input is above a sixth of its range.
        sigma = float(np.std((normal - quiet)[quiet > 255 / 6]))
        signal = preprocess_grey(with_lesion, size) - normal
        out[f"peak_{size}"] = float(np.abs(signal).max() / sigma)
        out[f"pixels_{size}"] = int(np.count_nonzero(np.abs(signal) > 3 * sigma))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, help="every lesion's figures as JSON")
    args = parser.parse_args()
    volume, _ = mni152_volume()
    levels = study_levels(volume, DEFAULT.slices_per_study)
    rows = [one_lesion(volume, levels, args.seed + i, args.sizes) for i in range(args.lesions)]
    if args.out:
        args.out.write_text(json.dumps(rows))
    head = ["diameter", "lesions"]
    for size in args.sizes:
        head += [f"peak {size}²", f"peak ≥ 5 at {size}²", f"pixels {size}²"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for low, high in zip(BINS, BINS[1:], strict=False):
        group = [r for r in rows if low <= r["diameter_mm"] < high]
        if not group:
            continue
        cells = [f"{low:g}–{high:g} mm", str(len(group))]
        for size in args.sizes:
            cells += [
                f"{statistics.median(r[f'peak_{size}'] for r in group):.1f}",
                f"{sum(r[f'peak_{size}'] >= 5 for r in group) / len(group):.2f}",
                f"{statistics.median(r[f'pixels_{size}'] for r in group):g}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
