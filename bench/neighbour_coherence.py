"""Issue 18 point 3: how alike are a synthetic study's neighbouring slices, and how much of their
difference is the generator drawing each slice's warp and bias field on its own?

    nice -n 10 .venv/bin/python bench/neighbour_coherence.py [--studies 40] [--size 128]

The study benchmark (``training.study_dataset.render_study``) renders every slice of a study
from the same subject (pose, scale, intensity, noise level), but draws each slice's rotation
jitter, elastic deformation, bias field and noise afresh. In a real series the anatomy is
continuous and the coil's bias field smooth across slices; only the noise is independent. A
2.5D model (``--context neighbours``) reads the slices above and below as context, so what
differs between neighbours that a scanner would not make differ is noise in that context.

For pairs of adjacent normal slices (the benchmark's 24 levels), the mean absolute difference
inside the brain, as the model receives it (``scanwatch.imaging.preprocess_slice``, 0-255),
three ways: as the benchmark renders them; with the warp and bias field drawn once for the
study (only the noise drawn per slice, as a scanner would); and the noise alone (the same
level rendered twice). The first less the second is the generator's own part.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from scanwatch.imaging import preprocess_slice
from scanwatch.sample import mni152_volume
from training.study_dataset import study_levels
from training.synthetic_dataset import _subject, _warp, finish_slice


def _render(volume: np.ndarray, level: int, subject: dict, geometry: int, noise: int) -> np.ndarray:
    """One normal slice: ``geometry`` seeds the warp and bias field, ``noise`` the noise."""
    image = _warp(volume[:, :, level], np.random.default_rng(geometry), subject)
    # finish_slice draws the bias field first, then the noise: split them over two seeds.
    bias_rng = np.random.default_rng(geometry)
    noise_rng = np.random.default_rng(noise)

    class Split:
        """The bias field's draws from one generator, the noise's from the other."""

        def __init__(self) -> None:
            self.calls = 0

        def normal(self, *args: object, **kwargs: object) -> np.ndarray:
            self.calls += 1
            source = bias_rng if self.calls == 1 else noise_rng
            return source.normal(*args, **kwargs)  # type: ignore[arg-type]

    return finish_slice(image, Split(), subject)  # type: ignore[arg-type]


def _input(image: np.ndarray, size: int) -> np.ndarray:
    """The slice as the model receives it (grey, 0-255)."""
    return preprocess_slice(image, size)[:, :, 0]


def _difference(a: np.ndarray, b: np.ndarray, brain: np.ndarray, size: int) -> float:
    return float(np.abs(_input(a, size) - _input(b, size))[brain].mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    volume, _affine = mni152_volume()
    levels = study_levels(volume, 24)
    root = np.random.default_rng(args.seed)
    rows: dict[str, list[float]] = {"as_rendered": [], "warp_and_bias_per_study": [], "noise": []}
    for _ in range(args.studies):
        subject = _subject(root)
        position = int(root.integers(2, len(levels) - 3))
        here, there = levels[position], levels[position + 1]
        seeds = root.integers(0, 2**31, 6)

        # inside the brain: the noise-free slice above a tenth of the input's range
        brain = (
            _input(_render(volume, here, {**subject, "noise": 0.0}, int(seeds[0]), 0), args.size)
            > 25.5
        )

        first = _render(volume, here, subject, int(seeds[0]), int(seeds[1]))
        rows["as_rendered"].append(
            _difference(
                first,
                _render(volume, there, subject, int(seeds[2]), int(seeds[3])),
                brain,
                args.size,
            )
        )
        rows["warp_and_bias_per_study"].append(
            _difference(
                first,
                _render(volume, there, subject, int(seeds[0]), int(seeds[3])),
                brain,
                args.size,
            )
        )
        rows["noise"].append(
            _difference(
                first,
                _render(volume, here, subject, int(seeds[0]), int(seeds[4])),
                brain,
                args.size,
            )
        )
    result = {
        "studies": args.studies,
        "size": args.size,
        "mean_abs_difference_in_brain_0_255": {
            name: {
                "median": round(float(np.median(values)), 2),
                "p90": round(float(np.quantile(values, 0.9)), 2),
            }
            for name, values in rows.items()
        },
    }
    print(json.dumps(result, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
