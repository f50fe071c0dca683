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

``--training-augmentation SIZE`` also passes each lesion's three inputs at SIZE (with the
lesion, without it, noise-free) through training's resampling augmentation as one
three-channel image, so that all three get the same rotation, shift and zoom: the stream's
(`training.input_pipeline`, every training image) and, before it, a balancing copy's (most
lesion-class images). Printed per diameter: the lesion's peak and the noise's standard
deviation after augmentation, each as a share of the unaugmented one, and the peak over the
augmented noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
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
    planted, _mask = _plant(image, lesion, 1.0, centre, rng)
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
        inputs = np.stack([preprocess_grey(p, size) for p in (with_lesion, without, clean)], -1)
        peak, sigma = peak_and_noise(inputs)
        out[f"peak_{size}"] = peak / sigma
        signal = inputs[..., 0] - inputs[..., 1]
        out[f"pixels_{size}"] = int(np.count_nonzero(np.abs(signal) > 3 * sigma))
        out[f"inputs_{size}"] = inputs
    return out


def peak_and_noise(inputs: np.ndarray) -> tuple[float, float]:
    """``(H, W, 3)`` inputs with the lesion, without it and noise-free → the lesion's largest
    |signal| and the noise's standard deviation in the brain (where the noise-free input is
    above a sixth of its range)."""
    lesion, normal, quiet = (inputs[..., i] for i in range(3))
    sigma = float(np.std((normal - quiet)[quiet > 255 / 6]))
    return float(np.abs(lesion - normal).max()), sigma


def augmentation_loss(rows: list[dict], size: int, seed: int) -> None:
    """Adds to each row its peak and noise after training's resampling augmentation, as shares
    of the unaugmented ones (see the module docstring)."""
    from training.input_pipeline import _geometric_augmenter, augment_image

    batch = np.stack([r[f"inputs_{size}"] for r in rows]).astype(np.float32)
    rng = np.random.default_rng(seed)
    copies = np.stack([augment_image(image, rng) for image in batch])
    augmenter = _geometric_augmenter(seed)
    unaugmented = [peak_and_noise(image) for image in batch]
    for name, images in (("stream", batch), ("copy", copies)):
        augmented = np.asarray(augmenter(images, training=True))
        for row, (peak, sigma), after in zip(rows, unaugmented, augmented, strict=True):
            new_peak, new_sigma = peak_and_noise(after)
            row[f"{name}_peak_share"] = new_peak / peak
            row[f"{name}_noise_share"] = new_sigma / sigma
            row[f"{name}_peak"] = new_peak / new_sigma


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--training-augmentation", type=int, metavar="SIZE")
    parser.add_argument("--out", type=Path, help="every lesion's figures as JSON")
    args = parser.parse_args()
    volume, _ = mni152_volume()
    levels = study_levels(volume, DEFAULT.slices_per_study)
    sizes = sorted(set(args.sizes) | {args.training_augmentation} - {None})
    rows = [one_lesion(volume, levels, args.seed + i, sizes) for i in range(args.lesions)]
    if args.training_augmentation:
        augmentation_loss(rows, args.training_augmentation, args.seed)
    for row in rows:
        for size in sizes:
            del row[f"inputs_{size}"]
    if args.out:
        args.out.write_text(json.dumps(rows))
    head = ["lesions"]
    for size in args.sizes:
        head += [f"peak {size}²", f"peak ≥ 5 at {size}²", f"pixels {size}²"]

    def cells(group: list[dict]) -> list[str]:
        out = [str(len(group))]
        for size in args.sizes:
            out += [
                f"{statistics.median(r[f'peak_{size}'] for r in group):.1f}",
                f"{sum(r[f'peak_{size}'] >= 5 for r in group) / len(group):.2f}",
                f"{statistics.median(r[f'pixels_{size}'] for r in group):g}",
            ]
        return out

    tables = [by_diameter(rows, head, cells)]
    if args.training_augmentation:
        tables.append(augmentation_table(rows, args.training_augmentation))
    sys.stdout.write("\n\n".join(tables) + "\n")
    return 0


def augmentation_table(rows: list[dict], size: int) -> str:
    head = [f"peak {size}²"]
    for name in ("stream", "copy"):
        head += [f"{name}: peak kept", f"{name}: noise kept", f"{name}: peak"]

    def cells(group: list[dict]) -> list[str]:
        out = [f"{statistics.median(r[f'peak_{size}'] for r in group):.1f}"]
        for name in ("stream", "copy"):
            for key, form in (("peak_share", ".2f"), ("noise_share", ".2f"), ("peak", ".1f")):
                out.append(format(statistics.median(r[f"{name}_{key}"] for r in group), form))
        return out

    return by_diameter(rows, head, cells)


def by_diameter(rows: list[dict], head: list[str], cells: Callable[[list[dict]], list[str]]) -> str:
    """A Markdown table with a row per diameter bin: the bin, then ``cells`` of its lesions."""
    head = ["diameter", *head]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for low, high in zip(BINS, BINS[1:], strict=False):
        group = [r for r in rows if low <= r["diameter_mm"] < high]
        if group:
            lines.append("| " + " | ".join([f"{low:g}–{high:g} mm", *cells(group)]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
