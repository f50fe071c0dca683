"""The offline benchmark dataset: synthetic subjects and planted anomalies on the real MNI152
brain MRI (``--dataset benchmark``; the benchmarks that *measure* things are in ``bench/``).

Every image starts from an axial slice of the MNI152 T1 template that nilearn bundles (a real 1 mm
brain MRI). Each synthetic *subject* gets its own anatomy variation (scaling, small rotation and
shift, smooth elastic deformation), intensity (gain, gamma, bias field) and noise level; each of
its slices is cut at one of several axial levels and gets one class:

- ``normal``: nothing planted;
- ``mass``: a round, well-circumscribed lesion with a textured core, a brighter rim and mass
  effect (the surrounding tissue is pushed outwards);
- ``bleed``: an irregular, hyperintense region (T1-bright, like subacute blood);
- ``infarct``: a hypointense wedge reaching the cortex (territorial, like an old infarct).

Size, position, contrast and texture are drawn per lesion. Slices are written as 12-bit stored
values in DICOM's row/column orientation and go through :func:`scanwatch.imaging.preprocess_slice`
exactly as the inference worker prepares a received slice. Subjects are split between train,
validation and test, so no subject's anatomy is in two splits. Everything follows from ``seed``.

The anomalies are synthetic: see ``training/DATA_CARD.md`` for what this benchmark is and is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from scanwatch.imaging import preprocess_slice
from scanwatch.sample import MAX_STORED_VALUE, brain_slice_indices, mni152_volume
from training.dataset import LabelledImages, Split

logger = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "mass", "bleed", "infarct")
#: Axial levels are spread over this share of the brain's extent (the caps hold little tissue).
LEVEL_RANGE = (0.15, 0.85)
#: Voxels above this value (template scale 0..1) count as brain tissue when placing lesions.
TISSUE_LEVEL = 0.3
#: Bumped whenever the generator's output changes, so that caches of older pixels are not reused.
GENERATOR_VERSION = 2
#: Mask erosion (voxels) so that a lesion centre has tissue around it.
CENTRE_MARGIN = 6


@dataclass(frozen=True)
class BenchmarkConfig:
    """What the benchmark contains. Same config → same pixels (the generator is seeded)."""

    image_size: int = 128
    train_subjects: int = 480
    val_subjects: int = 40
    test_subjects: int = 40
    #: Axial levels per subject; each level gives one image.
    slices_per_subject: int = 16
    seed: int = 2024

    def __post_init__(self) -> None:
        if min(self.train_subjects, self.val_subjects, self.test_subjects) < 1:
            raise ValueError("every split needs at least one subject")
        if self.slices_per_subject < len(CLASS_NAMES):
            raise ValueError(
                f"slices_per_subject must be >= {len(CLASS_NAMES)} (one per class), "
                f"got {self.slices_per_subject}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")

    @property
    def subjects(self) -> int:
        return self.train_subjects + self.val_subjects + self.test_subjects


#: The standard benchmark (``python -m training train``): 7 680 / 640 / 640 images. Until
#: 2026-11-26 it had a quarter of the subjects (120 / 20 / 20), on which EfficientNetB0 trained
#: from scratch memorised subjects and stalled near macro-F1 0.64-0.82 (bench/training.md).
DEFAULT = BenchmarkConfig()
#: A few seconds to build; CI trains on it end to end.
TINY = BenchmarkConfig(
    image_size=64, train_subjects=6, val_subjects=2, test_subjects=2, slices_per_subject=8
)
#: ``large`` stays as another name of the standard benchmark: it was 4× the old default, and
#: training.job.requested.v1 accepts it.
PRESETS = {"default": DEFAULT, "large": DEFAULT, "tiny": TINY}


# ---------------------------------------------------------------------------------------------
# Anatomy variation


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean smooth random field with unit maximum amplitude."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return field / (np.abs(field).max() + 1e-8)


def _warp(image: np.ndarray, rng: np.random.Generator, subject: dict) -> np.ndarray:
    """Affine (subject scale, rotation, shift) plus a slice-level elastic deformation."""
    rows, cols = image.shape
    centre = np.array([(rows - 1) / 2, (cols - 1) / 2])
    angle = np.deg2rad(subject["rotation_deg"] + rng.normal(0, 1.0))
    scale = np.array(subject["scale"])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Output pixel p samples input at  R^-1 S^-1 (p - c - t) + c.
    matrix = np.linalg.inv(rotation @ np.diag(scale))
    grid = np.indices(image.shape, dtype=np.float64).reshape(2, -1)
    coords = matrix @ (grid - centre[:, None] - np.array(subject["shift"])[:, None])
    coords += centre[:, None]
    amplitude = subject["elastic"]
    for axis in range(2):
        coords[axis] += (amplitude * _smooth_field(rng, image.shape, 14.0)).ravel()
    return ndimage.map_coordinates(image, coords, order=1, mode="constant").reshape(image.shape)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative field (second-order polynomial), 1 ± ``strength``."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    terms = np.stack([x, y, x * y, x**2, y**2])
    field = np.tensordot(rng.normal(0, 1, len(terms)), terms, axes=1)
    field /= np.abs(field).max() + 1e-8
    return 1.0 + strength * field


# ---------------------------------------------------------------------------------------------
# Anomalies: each returns the slice with the lesion planted (template intensity scale)


def _lesion_centre(
    rng: np.random.Generator, tissue: np.ndarray, near_cortex: bool = False
) -> np.ndarray:
    inner = ndimage.binary_erosion(tissue, iterations=CENTRE_MARGIN)
    if near_cortex:
        depth = ndimage.distance_transform_edt(tissue)
        band = inner & (depth < 3 * CENTRE_MARGIN)
        inner = band if band.any() else inner
    candidates = np.argwhere(inner if inner.any() else tissue)
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def _irregular_blob(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: np.ndarray,
    radius: float,
    aspect: float,
    irregularity: float,
) -> np.ndarray:
    """Soft mask (0..1) of an ellipse whose boundary is perturbed by smooth noise."""
    y, x = np.indices(shape, dtype=np.float64)
    theta = rng.uniform(0, np.pi)
    dy, dx = y - centre[0], x - centre[1]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    r = np.sqrt((u / aspect) ** 2 + (v * aspect) ** 2) / radius
    r = r + irregularity * _smooth_field(rng, shape, max(radius / 3, 1.5))
    return np.clip(1.5 - r * 1.5, 0, 1) ** 0.7 * (r < 1) + 0.0


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return _smooth_field(rng, shape, sigma)


def push_outwards(
    image: np.ndarray, centre: np.ndarray, radius: float, strength: float
) -> np.ndarray:
    """Mass effect: ``image`` resampled closer to ``centre`` near it, so the tissue around a
    lesion of ``radius`` is pushed outwards (by up to ``strength`` of the distance)."""
    grid = np.indices(image.shape, dtype=np.float64)
    offset = grid - centre[:, None, None]
    distance = np.sqrt((offset**2).sum(axis=0))
    push = strength * np.exp(-((distance / (1.6 * radius)) ** 2))
    return ndimage.map_coordinates(
        image, (centre[:, None, None] + offset * (1 - push)).reshape(2, -1), order=1
    ).reshape(image.shape)


def wedge_mask(
    tissue: np.ndarray, centre: np.ndarray, radius: float, half_angle: float
) -> np.ndarray:
    """Soft mask of a wedge: points within ``radius`` of ``centre``, within ``half_angle``
    (radians) of the direction towards the brain's centre of mass (a vascular territory seen in
    section), plus a small core."""
    inward = np.array(ndimage.center_of_mass(tissue)) - centre
    inward /= np.linalg.norm(inward) + 1e-8
    grid = np.indices(tissue.shape, dtype=np.float64)
    offset = grid - centre[:, None, None]
    distance = np.sqrt((offset**2).sum(axis=0)) + 1e-8
    cosine = (offset[0] * inward[0] + offset[1] * inward[1]) / distance
    wedge = ((distance < radius) & (cosine > np.cos(half_angle))) | (distance < radius * 0.35)
    return ndimage.gaussian_filter(wedge.astype(np.float64), 1.0)


def plant_mass(image: np.ndarray, rng: np.random.Generator, reference: float) -> np.ndarray:
    tissue = image > TISSUE_LEVEL
    centre = _lesion_centre(rng, tissue)
    radius = rng.uniform(11, 22)
    pushed = push_outwards(image, centre, radius, rng.uniform(0.25, 0.45))
    mask = _irregular_blob(rng, image.shape, centre, radius, rng.uniform(0.8, 1.25), 0.12)
    rim = np.clip(mask - ndimage.binary_erosion(mask > 0.5, iterations=2), 0, 1)
    rim = ndimage.gaussian_filter(rim.astype(np.float64), 0.8)
    core = (
        reference
        * rng.uniform(0.45, 0.75)
        * (1 + rng.uniform(0.1, 0.25) * _texture(rng, image.shape, rng.uniform(1.0, 2.5)))
    )
    out = pushed * (1 - mask) + core * mask
    return out + rim * reference * rng.uniform(0.5, 0.9)


def plant_bleed(image: np.ndarray, rng: np.random.Generator, reference: float) -> np.ndarray:
    tissue = image > TISSUE_LEVEL
    centre = _lesion_centre(rng, tissue)
    radius = rng.uniform(8, 16)
    mask = _irregular_blob(rng, image.shape, centre, radius, rng.uniform(0.6, 1.6), 0.35)
    for _ in range(rng.integers(0, 3)):  # satellite blobs make the outline irregular
        satellite = centre + rng.normal(0, radius * 0.6, 2)
        mask = np.maximum(
            mask,
            _irregular_blob(rng, image.shape, satellite, radius * rng.uniform(0.3, 0.6), 1.0, 0.3),
        )
    mask = ndimage.gaussian_filter(mask, 0.7) * tissue
    value = reference * rng.uniform(1.35, 1.75) * (1 + 0.08 * _texture(rng, image.shape, 1.5))
    return image * (1 - mask) + value * mask


def plant_infarct(image: np.ndarray, rng: np.random.Generator, reference: float) -> np.ndarray:
    tissue = image > TISSUE_LEVEL
    centre = _lesion_centre(rng, tissue, near_cortex=True)
    radius = rng.uniform(15, 28)
    wedge = wedge_mask(tissue, centre, radius, np.deg2rad(rng.uniform(25, 45)))
    wedge *= ndimage.gaussian_filter((image > TISSUE_LEVEL * 0.7).astype(np.float64), 1.0)
    dark = reference * rng.uniform(0.15, 0.35) * (1 + 0.05 * _texture(rng, image.shape, 2.0))
    return image * (1 - wedge) + dark * wedge


PLANTERS: dict[str, Callable[[np.ndarray, np.random.Generator, float], np.ndarray] | None] = {
    "normal": None,
    "mass": plant_mass,
    "bleed": plant_bleed,
    "infarct": plant_infarct,
}


# ---------------------------------------------------------------------------------------------
# Subjects and slices


def _subject(rng: np.random.Generator) -> dict:
    return {
        "scale": (rng.uniform(0.88, 1.12) * rng.uniform(0.96, 1.04), rng.uniform(0.88, 1.12)),
        "rotation_deg": rng.uniform(-10, 10),
        "shift": tuple(rng.uniform(-8, 8, 2)),
        "elastic": rng.uniform(1.0, 4.0),
        "gain": rng.uniform(0.8, 1.2),
        "gamma": rng.uniform(0.8, 1.25),
        "bias": rng.uniform(0.05, 0.25),
        "noise": rng.uniform(0.005, 0.035),
        "level_jitter": int(rng.integers(-3, 4)),
    }


def render_slice(
    axial: np.ndarray, class_name: str, rng: np.random.Generator, subject: dict
) -> np.ndarray:
    """One synthetic slice as 12-bit stored values (uint16) in DICOM row/column orientation."""
    image = _warp(axial, rng, subject)
    planter = PLANTERS[class_name]
    if planter is not None:
        tissue = image[image > TISSUE_LEVEL]
        reference = float(np.percentile(tissue, 75)) if tissue.size else 0.7
        image = planter(image, rng, reference)
    return finish_slice(image, rng, subject)


def finish_slice(image: np.ndarray, rng: np.random.Generator, subject: dict) -> np.ndarray:
    """A slice (template scale) with the subject's intensity, a bias field and Rician noise, as
    12-bit stored values (uint16) in DICOM row/column orientation."""
    image = np.clip(image, 0, None) ** subject["gamma"] * subject["gain"]
    image = image * _bias_field(rng, image.shape, subject["bias"])
    sigma = subject["noise"]
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    stored = np.clip(np.rint(noisy / 2.0 * MAX_STORED_VALUE), 0, MAX_STORED_VALUE)
    return dicom_orientation(stored.astype(np.uint16))


def dicom_orientation(image: np.ndarray) -> np.ndarray:
    """A template-space slice, RAS voxel [i, j], in DICOM rows (anterior→posterior) and columns
    (right→left), as scanwatch.sample writes the sample study, so that training sees what the
    worker reads."""
    return np.ascontiguousarray(image[::-1, ::-1].T)


def axial_levels(
    volume: np.ndarray, n: int, coverage: tuple[float, float] = LEVEL_RANGE
) -> list[int]:
    """``n`` axial indices spread evenly over ``coverage`` of the brain's extent."""
    first, *_, last = brain_slice_indices(volume, 2)
    low, high = coverage
    return [int(round(first + (last - first) * f)) for f in np.linspace(low, high, n)]


def build_benchmark(
    config: BenchmarkConfig = DEFAULT, progress: Callable[[int, int], None] | None = None
) -> LabelledImages:
    """Generate the benchmark (seconds for :data:`TINY`, a few minutes for :data:`DEFAULT`)."""
    volume, _affine = mni152_volume()
    levels = axial_levels(volume, config.slices_per_subject)
    root = np.random.SeedSequence(config.seed)
    subject_seeds = root.spawn(config.subjects)
    split_of = (
        ["train"] * config.train_subjects
        + ["val"] * config.val_subjects
        + ["test"] * config.test_subjects
    )
    parts: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in ("train", "val", "test")}
    total = config.subjects * config.slices_per_subject
    done = 0
    for number, (seed, split) in enumerate(zip(subject_seeds, split_of, strict=True)):
        rng = np.random.default_rng(seed)
        subject = _subject(rng)
        # Balanced classes per subject: each class on a quarter of the levels, shuffled.
        classes = np.resize(np.arange(len(CLASS_NAMES)), config.slices_per_subject)
        rng.shuffle(classes)
        images, labels, groups = parts[split]
        for level, label in zip(levels, classes, strict=True):
            k = int(
                np.clip(
                    level + subject["level_jitter"] + rng.integers(-2, 3), 0, volume.shape[2] - 1
                )
            )
            stored = render_slice(volume[:, :, k], CLASS_NAMES[label], rng, subject)
            images.append(preprocess_slice(stored, config.image_size)[:, :, :1])
            labels.append(int(label))
            groups.append(f"subject-{number:05d}")
            done += 1
            if progress is not None:
                progress(done, total)
    splits = {
        name: Split(
            np.stack(images).astype(np.float32),
            np.asarray(labels, dtype=np.int64),
            np.asarray(groups),
        )
        for name, (images, labels, groups) in parts.items()
    }
    description = {
        "source": "mni152-synthetic-benchmark",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
    }
    return LabelledImages(CLASS_NAMES, description=description, **splits)


def cache_path(config: BenchmarkConfig, cache_dir: Path) -> Path:
    """Where :func:`load_or_build` keeps the benchmark built with ``config``."""
    key = "-".join(f"{k}{v}" for k, v in asdict(config).items())
    return Path(cache_dir) / f"benchmark-v{GENERATOR_VERSION}-{key}.npz"


def load_or_build(
    config: BenchmarkConfig,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> LabelledImages:
    """The benchmark from ``cache_dir`` if it was built before with this config, else build it."""
    if cache_dir is None:
        return build_benchmark(config, progress)
    path = cache_path(config, cache_dir)
    if path.is_file():
        logger.info("benchmark loaded from cache", extra={"path": str(path)})
        return LabelledImages.load(path)
    data = build_benchmark(config, progress)
    data.save(path)
    logger.info("benchmark built and cached", extra={"path": str(path)})
    return data
