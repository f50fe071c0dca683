"""The study benchmark: whole synthetic MR studies, most of each normal, some with one lesion on a
few adjacent slices, its size and contrast drawn from wide ranges down to small, faint foci
(``--dataset studies``; issue 18).

A *study* is one synthetic subject of :mod:`training.synthetic_dataset` (anatomy, intensity and
noise varied per subject) cut into ``slices_per_study`` axial slices spread evenly over the
brain, as a scanner's axial series is. An abnormal study gets one lesion:

- its **kind** is one of the benchmark's abnormal classes, drawn so that each is equally likely:
  ``mass`` (hypointense core, brighter rim, mass effect when large), ``bleed`` (hyperintense,
  irregular), ``infarct`` (hypointense; a wedge reaching the cortex when large, a round deep
  focus when small, as a lacune is);
- its **diameter** (largest in-plane extent, in mm of the template) is drawn log-uniformly from
  ``diameter_mm``, so small lesions are as common as large ones on a log scale;
- its **contrast** (intensity relative to the tissue around it: ``+0.2`` is 20 % brighter) is
  drawn log-uniformly in magnitude from ``contrast``, with the kind's sign (bleeds brighter,
  masses and infarcts darker);
- it spans ``span_slices`` adjacent slices (drawn in that range), largest in the middle: an
  ellipsoid cut by the slice planes.

Every slice of a lesion's span is labelled with the lesion's class, every other slice
``normal``; each study records its lesion (:class:`StudyInfo`). Validation and test studies are
whole (every slice rendered): the study-level evaluation scores them as the worker scores a
received series. Training studies are rendered in part, because the slice classifier trains
on slices: every lesion slice and ``normal_slices_per_study`` normal slices of each study.

**Context from neighbouring slices** (issue 18, 2.5D): a model may see each slice with the
slice below and the slice above as its first and third channels (``context="neighbours"``,
:func:`study_inputs`). Validation and test studies are whole, so every slice has its
neighbours; training studies render them too when ``train_neighbours`` is set (they are
context only, not training slices), and the slice classifier's data is then built from them
(:meth:`StudyBenchmark.slice_dataset`). Without it the benchmark is the one built before, pixel
for pixel and in the same cache file.

Everything follows from ``seed``. The lesions are synthetic: see ``training/DATA_CARD.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from scipy import ndimage

from scanwatch.durable import replace_file
from scanwatch.imaging import (
    INPUT_CONTEXTS,
    NEIGHBOURS,
    NO_CONTEXT,
    neighbour_channels,
    preprocess_slice,
    square_resize,
)
from scanwatch.sample import mni152_volume
from training.dataset import FROM_STUDIES, SPLITS, LabelledImages, Split
from training.synthetic_dataset import (
    CLASS_NAMES,
    TISSUE_LEVEL,
    _irregular_blob,
    _smooth_field,
    _subject,
    _warp,
    axial_levels,
    dicom_orientation,
    finish_slice,
    push_outwards,
    wedge_mask,
)

logger = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes, so that caches of older pixels are not reused.
GENERATOR_VERSION = 1
#: The brain's extent that a study covers (the caps hold little tissue).
COVERAGE = (0.08, 0.92)
#: Which sign each kind's contrast has.
CONTRAST_SIGN = {"mass": -1.0, "bleed": 1.0, "infarct": -1.0}
#: Infarcts at least this large (mm) are cortical wedges; smaller ones are round deep foci.
WEDGE_FROM_MM = 18.0
#: Masses at least this large (mm) push the tissue around them.
MASS_EFFECT_FROM_MM = 15.0


@dataclass(frozen=True)
class StudyConfig:
    """What the study benchmark contains. Same config → same pixels (the generator is seeded)."""

    image_size: int = 128
    train_studies: int = 1200
    val_studies: int = 160
    test_studies: int = 240
    slices_per_study: int = 24
    #: Share of abnormal studies in validation and test (training: ``train_abnormal_fraction``).
    abnormal_fraction: float = 0.5
    train_abnormal_fraction: float = 0.75
    #: Normal slices rendered per training study (besides every lesion slice).
    normal_slices_per_study: int = 3
    diameter_mm: tuple[float, float] = (4.0, 40.0)
    contrast: tuple[float, float] = (0.12, 0.8)
    span_slices: tuple[int, int] = (2, 5)
    seed: int = 2026
    #: Render each training slice's neighbours too (as context for ``neighbours`` inputs; they
    #: are not training slices themselves). Changes the training pixels drawn after them.
    train_neighbours: bool = False
    #: More training studies, drawn from seeds spawned after every split's: validation and test
    #: stay the same studies as with none (``train_studies`` would move them). The training
    #: split has ``train_studies + extra_train_studies`` studies.
    extra_train_studies: int = 0
    #: Keep each slice's lesion mask (:attr:`StudySet.masks`) for training with location
    #: supervision. The pixels are the same with or without.
    lesion_masks: bool = False

    def __post_init__(self) -> None:
        if min(self.train_studies, self.val_studies, self.test_studies) < 2:
            raise ValueError("every split needs at least two studies")
        if self.slices_per_study < 8:
            raise ValueError(f"slices_per_study must be >= 8, got {self.slices_per_study}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        for name in ("abnormal_fraction", "train_abnormal_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("diameter_mm", "contrast"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be a range 0 < low <= high, got {(low, high)}")
        low, high = self.span_slices
        if not 1 <= low <= high <= self.slices_per_study // 2:
            raise ValueError(f"span_slices must be within 1..{self.slices_per_study // 2}")
        if self.normal_slices_per_study < 1:
            raise ValueError("normal_slices_per_study must be >= 1")
        if self.extra_train_studies < 0:
            raise ValueError(f"extra_train_studies must be >= 0, got {self.extra_train_studies}")


#: The standard study benchmark (about 7 000 training slices, 3 840 / 5 760 slices in 160 / 240
#: whole validation / test studies).
DEFAULT = StudyConfig()
#: Seconds to build; CI trains on it end to end.
TINY = StudyConfig(
    image_size=64,
    train_studies=12,
    val_studies=6,
    test_studies=6,
    slices_per_study=10,
    normal_slices_per_study=2,
    span_slices=(2, 3),
)
PRESETS = {"default": DEFAULT, "tiny": TINY}


@dataclass(frozen=True)
class StudyInfo:
    """One study and its lesion (a normal study: label 0, diameter and contrast 0)."""

    study_id: str
    label: int
    diameter_mm: float
    contrast: float
    #: Positions (0-based, in the study's slice order) where the lesion is visible.
    lesion_slices: tuple[int, ...]


@dataclass(frozen=True)
class StudySet:
    """One split, slices in study order, each study's slices contiguous and in position order."""

    images: np.ndarray  # (n, S, S, 1) float32, preprocessed as the worker does
    labels: np.ndarray  # (n,) int64, per slice
    study_index: np.ndarray  # (n,) int64 into ``studies``
    position: np.ndarray  # (n,) int64 slice position within its study
    studies: tuple[StudyInfo, ...]
    #: (n,) bool: rendered only as a neighbour's context, not a slice of the split's table
    #: (training studies built with ``train_neighbours``); None: every row is a slice.
    context_only: np.ndarray | None = None
    #: (n, S, S) uint8: the share of each input pixel the lesion covers, 0–255 (0 on a normal
    #: slice), on the input's grid (benchmarks built with ``lesion_masks``); else None.
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.study_index) == len(self.position) == n):
            raise ValueError("images, labels, study_index and position differ in length")
        for name in ("context_only", "masks"):
            extra = getattr(self, name)
            if extra is not None and len(extra) != n:
                raise ValueError(f"{name} differs in length from images")

    def sample_rows(self) -> np.ndarray:
        """The rows that are slices of the split (every row but context-only ones)."""
        if self.context_only is None:
            return np.arange(len(self.images))
        return np.flatnonzero(~self.context_only)

    def slices_of(self, study: int) -> np.ndarray:
        """Row indices of one study's slices, in position order."""
        return np.flatnonzero(self.study_index == study)


@dataclass(frozen=True)
class StudyBenchmark:
    class_names: tuple[str, ...]
    train: StudySet
    val: StudySet
    test: StudySet
    description: dict

    def slice_dataset(
        self, context: str = NO_CONTEXT, min_lesion_mm: float = 0.0
    ) -> LabelledImages:
        """The slice classifier's data: every rendered training slice (but, with
        ``min_lesion_mm``, no lesion slice where the lesion is narrower than that: its label
        says "abnormal" of pixels the model cannot tell from normal ones); for validation and test,
        every lesion slice and, per study, as many normal slices as a training study has
        (:func:`slice_table_rows`), so that the slice table is not swamped by normal slices. Groups
        are studies (a study is a subject), so no study straddles two splits.

        ``context``: the model's input channels (:func:`study_inputs`): ``none`` keeps the grey
        ``(n, S, S, 1)`` images the input pipeline repeats; ``neighbours`` gives ``(n, S, S, 3)``
        and needs a benchmark built with ``train_neighbours`` (ValueError otherwise)."""
        if context == NEIGHBOURS and not self.description["config"].get("train_neighbours"):
            raise ValueError(
                "context 'neighbours' needs a study benchmark built with train_neighbours "
                "(its training slices' neighbours rendered)"
            )
        per_study = int(self.description["config"]["normal_slices_per_study"])
        train_rows = self.train.sample_rows()
        if min_lesion_mm > 0:
            train_rows = train_rows[lesion_width_mm(self.train, train_rows) >= min_lesion_mm]
        splits = {"train": _as_split(self.train, train_rows, context)}
        for name in ("val", "test"):
            study_set: StudySet = getattr(self, name)
            splits[name] = _as_split(study_set, slice_table_rows(study_set, per_study), context)
        description = {**self.description, "slices_from": FROM_STUDIES}
        if context != NO_CONTEXT:
            description["context"] = context
        if min_lesion_mm > 0:
            description["train_min_lesion_mm"] = min_lesion_mm
        return LabelledImages(self.class_names, description=description, **splits)

    def save(self, path: Path) -> None:
        """Write to one ``.npz`` (written beside, then renamed: never half a file)."""
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(
                json.dumps({"class_names": self.class_names, "description": self.description})
            )
        }
        for name in SPLITS:
            s: StudySet = getattr(self, name)
            arrays |= {
                f"{name}_images": s.images,
                f"{name}_labels": s.labels,
                f"{name}_study_index": s.study_index,
                f"{name}_position": s.position,
                f"{name}_studies": np.array(json.dumps([asdict(i) for i in s.studies])),
            }
            for extra in ("context_only", "masks"):
                if getattr(s, extra) is not None:
                    arrays[f"{name}_{extra}"] = getattr(s, extra)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(temp, **cast(dict[str, Any], arrays))
        replace_file(temp, path)

    @classmethod
    def load(cls, path: Path) -> StudyBenchmark:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            sets = {
                name: StudySet(
                    data[f"{name}_images"],
                    data[f"{name}_labels"],
                    data[f"{name}_study_index"],
                    data[f"{name}_position"],
                    tuple(
                        StudyInfo(**(info | {"lesion_slices": tuple(info["lesion_slices"])}))
                        for info in json.loads(str(data[f"{name}_studies"]))
                    ),
                    data[f"{name}_context_only"] if f"{name}_context_only" in data else None,
                    data[f"{name}_masks"] if f"{name}_masks" in data else None,
                )
                for name in SPLITS
            }
        return cls(tuple(meta["class_names"]), description=meta["description"], **sets)


def slice_table_rows(study_set: StudySet, normal_per_study: int) -> np.ndarray:
    """The rows of a whole-study split in its slice table: every lesion slice and, per study,
    ``normal_per_study`` normal slices, each the middle one of an equal share of the study's
    normal slices (not its first and last: the ends of a study, above and below the brain, are
    the easiest slices to call normal, and would be two of every three)."""
    rows: list[int] = []
    for study in range(len(study_set.studies)):
        members = np.intersect1d(study_set.slices_of(study), study_set.sample_rows())
        lesion = members[study_set.labels[members] != 0]
        normal = members[study_set.labels[members] == 0]
        count = min(normal_per_study, len(normal))
        picks = ((np.arange(count) + 0.5) * len(normal) / count).astype(int)
        rows += lesion.tolist() + normal[picks].tolist()
    return np.sort(np.asarray(rows, dtype=np.int64))


def lesion_width_mm(study_set: StudySet, rows: np.ndarray) -> np.ndarray:
    """The lesion's diameter on each of ``rows`` (mm; ``inf`` on a normal slice, which no width
    filter drops)."""
    width = np.full(len(rows), np.inf)
    for i, row in enumerate(rows):
        if study_set.labels[row] == 0:
            continue
        info = study_set.studies[study_set.study_index[row]]
        offset = int(study_set.position[row]) - info.lesion_slices[0]
        width[i] = info.diameter_mm * cross_section(len(info.lesion_slices), offset)
    return width


def _as_split(study_set: StudySet, rows: np.ndarray, context: str) -> Split:
    groups = np.array([study_set.studies[i].study_id for i in study_set.study_index[rows]])
    masks = None if study_set.masks is None else study_set.masks[rows]
    return Split(study_inputs(study_set, context, rows), study_set.labels[rows], groups, masks)


class SlicesInOrder(Protocol):
    """What :func:`study_inputs` reads of a split (a :class:`StudySet`, or the evaluation's
    ``StudySetLike``)."""

    @property
    def images(self) -> np.ndarray: ...
    @property
    def study_index(self) -> np.ndarray: ...
    @property
    def position(self) -> np.ndarray: ...


def study_inputs(
    study_set: SlicesInOrder, context: str = NO_CONTEXT, rows: np.ndarray | None = None
) -> np.ndarray:
    """The model inputs of ``rows`` (default: every row) of ``study_set`` for a model trained
    with ``context``.

    ``none``: the grey ``(n, S, S, 1)`` images as they are (the input pipeline repeats them
    into three channels). ``neighbours``: ``(n, S, S, 3)``, channels the slice at the previous
    position of the same study, the slice, the slice at the next position
    (:func:`scanwatch.imaging.neighbour_channels`, as the worker builds them from a series); a
    neighbour the set does not hold (the study's first or last slice) is the slice itself."""
    if context not in INPUT_CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(INPUT_CONTEXTS)}, got {context!r}")
    rows = np.arange(len(study_set.images)) if rows is None else np.asarray(rows)
    if context == NO_CONTEXT:
        return study_set.images[rows]
    at = {
        (int(s), int(p)): row
        for row, (s, p) in enumerate(zip(study_set.study_index, study_set.position, strict=True))
    }
    below, above = (
        np.array(
            [
                at.get((int(study_set.study_index[r]), int(study_set.position[r]) + step), r)
                for r in rows
            ],
            dtype=np.intp,
        )
        for step in (-1, 1)
    )
    return neighbour_channels(study_set.images, rows, below, above)


# ---------------------------------------------------------------------------------------------
# Lesions with explicit size and contrast


@dataclass(frozen=True)
class Lesion:
    kind: str
    diameter_mm: float
    contrast: float  # signed
    centre_slice: int
    span: int
    aspect: float
    irregularity: float


def _draw_lesion(rng: np.random.Generator, config: StudyConfig, n_slices: int) -> Lesion:
    kind = CLASS_NAMES[1 + int(rng.integers(len(CLASS_NAMES) - 1))]
    low, high = config.diameter_mm
    diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    low, high = config.contrast
    contrast = CONTRAST_SIGN[kind] * float(np.exp(rng.uniform(np.log(low), np.log(high))))
    span = int(rng.integers(config.span_slices[0], config.span_slices[1] + 1))
    # The lesion's slices stay inside the study's middle 80 % (tissue is there).
    first = int(rng.integers(n_slices // 10, n_slices - n_slices // 10 - span + 1))
    return Lesion(
        kind=kind,
        diameter_mm=diameter,
        contrast=contrast,
        centre_slice=first,  # the first slice of its span
        span=span,
        aspect=float(rng.uniform(0.75, 1.33)),
        irregularity=float(rng.uniform(0.05, 0.3 if kind == "bleed" else 0.15)),
    )


def cross_section(span: int, offset: int) -> float:
    """A lesion's radius factor on the ``offset``-th of the ``span`` slices it spans (largest
    mid-span): its diameter on that slice is the lesion's diameter times this."""
    if span == 1:
        return 1.0
    t = (2 * offset - (span - 1)) / span  # in (-1, 1)
    return float(0.55 + 0.45 * np.sqrt(max(0.0, 1 - t * t)))


def _lesion_centre(
    rng: np.random.Generator, tissue: np.ndarray, radius: float, kind: str, large: bool
) -> np.ndarray:
    depth = ndimage.distance_transform_edt(tissue)
    inside = depth > max(radius, 3.0) + 2
    if kind == "infarct" and large:
        band = inside & (depth < radius + 8)
        inside = band if band.any() else inside
    candidates = np.argwhere(inside if inside.any() else tissue)
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def _plant(
    image: np.ndarray,
    lesion: Lesion,
    factor: float,
    centre: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (template scale) with one cross-section of ``lesion`` planted at ``centre``,
    and the lesion's mask (the share of each pixel it replaced, 0–1)."""
    radius = lesion.diameter_mm / 2 * factor
    tissue = image > TISSUE_LEVEL
    # The tissue around the lesion, smoothed over its size: the contrast's reference.
    weights = ndimage.gaussian_filter(tissue.astype(np.float64), max(radius, 2.0))
    smoothed = ndimage.gaussian_filter(image * tissue, max(radius, 2.0))
    at = tuple(np.clip(np.round(centre).astype(int), 0, np.array(image.shape) - 1))
    local = float(smoothed[at] / max(weights[at], 1e-6)) if weights[at] > 0.05 else 0.6
    texture = _smooth_field(rng, image.shape, max(radius / 3, 1.0))
    value = local * (1 + lesion.contrast) * (1 + 0.06 * texture)
    if lesion.kind == "infarct" and lesion.diameter_mm >= WEDGE_FROM_MM:
        mask = wedge_mask(image > TISSUE_LEVEL, centre, radius, np.deg2rad(rng.uniform(25, 45)))
    else:
        mask = _irregular_blob(rng, image.shape, centre, radius, lesion.aspect, lesion.irregularity)
        if lesion.kind == "bleed":
            mask = ndimage.gaussian_filter(mask, 0.6)
    mask = mask * ndimage.gaussian_filter((image > TISSUE_LEVEL * 0.7).astype(np.float64), 1.0)
    base = image
    if lesion.kind == "mass" and lesion.diameter_mm >= MASS_EFFECT_FROM_MM:
        base = push_outwards(image, centre, radius, rng.uniform(0.2, 0.4))
    out = base * (1 - mask) + value * mask
    if lesion.kind == "mass" and radius >= 3:
        rim = np.clip(mask - ndimage.binary_erosion(mask > 0.5, iterations=2), 0, 1)
        rim = ndimage.gaussian_filter(rim.astype(np.float64), 0.8)
        out = out + rim * local * abs(lesion.contrast) * rng.uniform(0.6, 1.0)
    return out, mask


# ---------------------------------------------------------------------------------------------
# Studies


def study_levels(volume: np.ndarray, n: int) -> list[int]:
    """``n`` axial indices spread over :data:`COVERAGE` of the brain's extent."""
    return axial_levels(volume, n, COVERAGE)


def render_study(
    volume: np.ndarray,
    levels: list[int],
    rng: np.random.Generator,
    lesion: Lesion | None,
    only: frozenset[int] | None = None,
) -> list[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """``(position, label, stored slice, lesion mask)`` of the study's slices (those at the
    positions in ``only``, when given), in position order. The mask (float, 0–1) has the
    stored slice's orientation and shape; None where no lesion was planted."""
    subject = _subject(rng)
    jitter = subject["level_jitter"]
    span = range(lesion.centre_slice, lesion.centre_slice + lesion.span) if lesion else range(0)
    label = CLASS_NAMES.index(lesion.kind) if lesion else 0
    centre: np.ndarray | None = None
    out = []
    for position, level in enumerate(levels):
        if only is not None and position not in only:
            continue
        lesioned = position in span
        mask = None
        k = int(np.clip(level + jitter, 0, volume.shape[2] - 1))
        image = _warp(volume[:, :, k], rng, subject)
        if lesion is not None and lesioned:
            if centre is None:  # placed on the first slice of its span, kept for the rest
                tissue = image > TISSUE_LEVEL
                centre = _lesion_centre(
                    rng,
                    tissue,
                    lesion.diameter_mm / 2,
                    lesion.kind,
                    lesion.diameter_mm >= WEDGE_FROM_MM,
                )
            factor = cross_section(lesion.span, position - lesion.centre_slice)
            image, planted = _plant(image, lesion, factor, centre, rng)
            mask = dicom_orientation(planted)
        stored = finish_slice(image, rng, subject)
        out.append((position, label if lesioned else 0, stored, mask))
    return out


def _build_split(
    volume: np.ndarray,
    levels: list[int],
    config: StudyConfig,
    seeds: list[np.random.SeedSequence],
    prefix: str,
    abnormal_fraction: float,
    whole: bool,
    progress: Callable[[], None],
) -> StudySet:
    images, labels, study_index, positions, studies = [], [], [], [], []
    masks: list[np.ndarray] = []
    context_only: list[bool] = []
    n_abnormal = int(round(len(seeds) * abnormal_fraction))
    for number, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        lesion = _draw_lesion(rng, config, len(levels)) if number < n_abnormal else None
        span = range(lesion.centre_slice, lesion.centre_slice + lesion.span) if lesion else range(0)
        only = None
        context: frozenset[int] = frozenset()
        if not whole:  # every lesion slice and a few normal ones
            normal = [p for p in range(len(levels)) if p not in span]
            picked = rng.choice(normal, config.normal_slices_per_study, replace=False)
            only = frozenset(span) | frozenset(int(p) for p in picked)
            if config.train_neighbours:
                near = {p + step for p in only for step in (-1, 1)}
                context = frozenset(p for p in near if 0 <= p < len(levels)) - only
                only |= context
        rendered = render_study(volume, levels, rng, lesion, only)
        for position, label, stored, mask in rendered:
            images.append(preprocess_slice(stored, config.image_size)[:, :, :1])
            if config.lesion_masks:
                masks.append(mask_input(mask, config.image_size))
            labels.append(label)
            study_index.append(number)
            positions.append(position)
            context_only.append(position in context)
            progress()
        studies.append(
            StudyInfo(
                study_id=f"{prefix}-{number:05d}",
                label=CLASS_NAMES.index(lesion.kind) if lesion else 0,
                diameter_mm=round(lesion.diameter_mm, 2) if lesion else 0.0,
                contrast=round(lesion.contrast, 3) if lesion else 0.0,
                lesion_slices=tuple(span),
            )
        )
    return StudySet(
        np.stack(images).astype(np.float32),
        np.asarray(labels, dtype=np.int64),
        np.asarray(study_index, dtype=np.int64),
        np.asarray(positions, dtype=np.int64),
        tuple(studies),
        np.asarray(context_only, dtype=bool) if config.train_neighbours else None,
        np.stack(masks) if config.lesion_masks else None,
    )


def mask_input(mask: np.ndarray | None, size: int) -> np.ndarray:
    """A stored slice's lesion mask (None: no lesion) on the model input's grid, as the slice's
    pixels are resized (:func:`~scanwatch.imaging.square_resize`): uint8, 0–255."""
    if mask is None:
        return np.zeros((size, size), np.uint8)
    resized = square_resize(np.asarray(mask, np.float32), size)
    return np.clip(np.rint(resized * 255), 0, 255).astype(np.uint8)


def build_studies(
    config: StudyConfig = DEFAULT, progress: Callable[[int, int], None] | None = None
) -> StudyBenchmark:
    """Generate the study benchmark (seconds for :data:`TINY`, minutes for :data:`DEFAULT`)."""
    volume, _affine = mni152_volume()
    levels = study_levels(volume, config.slices_per_study)
    root = np.random.SeedSequence(config.seed)
    seeds = root.spawn(config.train_studies + config.val_studies + config.test_studies)
    n_train, n_val = config.train_studies, config.val_studies
    train_seeds = seeds[:n_train] + root.spawn(config.extra_train_studies)
    expected_train = len(train_seeds) * (
        config.normal_slices_per_study
        + config.train_abnormal_fraction * sum(config.span_slices) / 2
    )
    total = int(
        expected_train + (config.val_studies + config.test_studies) * config.slices_per_study
    )
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total), total)

    splits = {
        "train": _build_split(
            volume,
            levels,
            config,
            train_seeds,
            "train",
            config.train_abnormal_fraction,
            False,
            tick,
        ),
        "val": _build_split(
            volume,
            levels,
            config,
            seeds[n_train : n_train + n_val],
            "val",
            config.abnormal_fraction,
            True,
            tick,
        ),
        "test": _build_split(
            volume,
            levels,
            config,
            seeds[n_train + n_val :],
            "test",
            config.abnormal_fraction,
            True,
            tick,
        ),
    }
    description = {
        "source": "mni152-synthetic-studies",
        "generator_version": GENERATOR_VERSION,
        "config": json.loads(json.dumps(config_record(config))),  # as a cache reads it back
    }
    return StudyBenchmark(CLASS_NAMES, description=description, **splits)


def config_record(config: StudyConfig) -> dict[str, Any]:
    """``config`` as recorded in a benchmark's description and cache key; ``train_neighbours``,
    ``extra_train_studies`` and ``lesion_masks`` only when set, so that a benchmark built
    before they existed keeps its cache file."""
    record = asdict(config)
    for name in ("train_neighbours", "extra_train_studies", "lesion_masks"):
        if not getattr(config, name):
            del record[name]
    return record


def cache_path(config: StudyConfig, cache_dir: Path) -> Path:
    """Where :func:`load_or_build` keeps the benchmark built with ``config`` (named by the
    generator version, the image size and a digest of the whole config)."""
    digest = hashlib.sha256(json.dumps(config_record(config), sort_keys=True).encode()).hexdigest()
    name = f"studies-v{GENERATOR_VERSION}-{config.image_size}px-{digest[:16]}.npz"
    return Path(cache_dir) / name


def load_or_build(
    config: StudyConfig,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> StudyBenchmark:
    """The study benchmark from ``cache_dir`` if built before with this config, else build it."""
    if cache_dir is None:
        return build_studies(config, progress)
    path = cache_path(config, cache_dir)
    if path.is_file():
        logger.info("study benchmark loaded from cache", extra={"path": str(path)})
        return StudyBenchmark.load(path)
    data = build_studies(config, progress)
    data.save(path)
    logger.info("study benchmark built and cached", extra={"path": str(path)})
    return data
