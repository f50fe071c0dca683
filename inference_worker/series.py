"""Read a ready study from the file store, choose the MR series and slices to score, and turn
them into model input with the preprocessing that training uses.

Each instance's header is read once (:func:`read_instances`, the pixel data left in the file)
into what selection needs (:func:`inference_worker.header.read_selection_header`): by a header
scan that builds no ``Dataset`` for the single-frame native instances scanners send, by pydicom
for the rest. The chosen series' middle instance alone is read for the patient and study facts
of the result (:func:`inference_worker.header.read_header`; by pydicom). Pixel data is then read
and decoded once per scored instance (a multi-frame instance once for all its frames), by
:mod:`inference_worker.pixels`, in this process or a pool of them, without parsing the header
again.

**Which slices** (:func:`slices_to_score`): the whole volume. By default every image of the
chosen series is scored, so a finding on two slices of two hundred is looked at. With
``max_gap_mm`` set, slices may be left out as long as no more than that many millimetres of
the volume lie unscanned between two scored slices: the gap between neighbours is the distance
of their positions along the slice normal (ImagePositionPatient projected on the normal of
ImageOrientationPatient) less half of each one's SliceThickness. ``max_gap_mm=0`` then drops
only overlapping slices (spacing below the thickness) and duplicates at one position. A series
whose positions are not all known (no ImagePositionPatient or ImageOrientationPatient) is
scored whole whatever ``max_gap_mm`` says: a gap cannot be measured there.

**Which pixels** (:func:`context_plan`): a model trained with ``neighbours`` context (its
``study_rule`` says so) gets each scored slice with the slice below and the slice above as its
first and third channels: the series' adjacent images in the same order along the normal, the
slice itself at either end. With ``max_gap_mm`` those neighbours need not be scored slices, so
they are decoded too; without context only the scored slices are decoded, as before.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset

from inference_worker.errors import UnusableStudy
from inference_worker.header import (
    ORIENTATIONS,
    PRESENCE_TAGS,
    SCANNED_TAGS,
    InstanceHeader,
    ScannedAttributes,
    read_header,
    read_selection_header,
)
from inference_worker.pixels import (
    LAYOUT_TAGS,
    PIXEL_DATA_TAG,
    InstancePixels,
    PixelSource,
    decode_and_resize,
    describe,
    into_grey,
    into_rgb,
    native_from_scan,
)
from scanwatch.dicom_scan import scan_file
from scanwatch.imaging import NEIGHBOURS, NO_CONTEXT, neighbour_channels
from schemas import InstanceRef

__all__ = [
    "ORIENTATIONS",
    "Frame",
    "ChosenSeries",
    "SelectedSeries",
    "SelectionRules",
    "UnusableStudy",
    "ContextPlan",
    "choose_series",
    "context_plan",
    "path_of",
    "pixel_work",
    "prepare_series",
    "read_instances",
    "select_series",
    "selected",
    "slices_to_score",
]


@dataclass(frozen=True)
class SelectionRules:
    """Which series of a study is scored, and which of its slices.

    Candidates are the MR series with at least ``min_slices`` images in the wanted
    ``orientation``; among them a series whose SeriesDescription matches
    ``description_pattern`` (a case-insensitive regular expression) wins, then the one with the
    most images. Its slices are chosen by :func:`slices_to_score` with ``max_gap_mm`` (None:
    every slice).
    """

    description_pattern: str | None = None
    min_slices: int = 1
    orientation: str = "any"
    max_gap_mm: float | None = None

    def __post_init__(self) -> None:
        if self.max_gap_mm is not None and not 0 <= self.max_gap_mm < float("inf"):
            raise ValueError(f"max_gap_mm must be a finite number >= 0, got {self.max_gap_mm}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}")
        if self.description_pattern is not None:
            re.compile(self.description_pattern)  # fail at start-up, not on the first study


@dataclass(frozen=True)
class Frame:
    """One image of a series: an instance, and a frame index for multi-frame instances."""

    ref: InstanceRef
    index: int | None
    position: float
    slope: float
    intercept: float
    located: bool = True  # ``position`` is a distance along the slice normal (mm)
    thickness: float | None = None  # SliceThickness (mm)


@dataclass(frozen=True)
class SourceSlice:
    """A scored slice: the stored instance, and a frame index for multi-frame instances."""

    SOPInstanceUID: str
    path: Path
    frame: int | None  # 0-based; None for a single-frame instance


@dataclass(frozen=True)
class ChosenSeries:
    """The series chosen for scoring and its slices, from the headers alone (no pixels yet, no
    model needed): enough to record the study as received."""

    header: InstanceHeader  # of the middle instance of the series
    SeriesInstanceUID: str
    number_of_instances: int
    number_of_series: int
    study_instance_count: int
    frames: tuple[Frame, ...]  # the slices to score, in order along the normal
    #: Where each instance's pixels are, by SOPInstanceUID (see :func:`_read`): those of
    #: every image of the series, so that a scored slice's neighbours can be decoded too.
    sources: dict[str, PixelSource] = field(default_factory=dict, compare=False, repr=False)
    #: Every image of the series in order along the normal (``frames`` is a subset of it);
    #: empty: ``frames`` is the whole series.
    series_frames: tuple[Frame, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen for scoring, its model input and the header facts the result needs."""

    header: InstanceHeader  # of the middle instance of the series
    SeriesInstanceUID: str
    number_of_instances: int
    number_of_series: int
    study_instance_count: int
    images: npt.NDArray[np.float32]  # (n, size, size, 3)
    #: The stored slice behind each row of ``images``, in the same order (heatmaps refer to it).
    slices: tuple[SourceSlice, ...] = ()


def path_of(storage_uri: str) -> Path:
    """The local path of a ``file://`` storage URI."""
    parsed = urlparse(storage_uri)
    if parsed.scheme != "file":
        raise UnusableStudy(f"unsupported storage URI scheme {parsed.scheme!r}")
    return Path(unquote(parsed.path))


#: Element values longer than this are left in the file when an instance is read (pixel data
#: above all): the same dataset reads them later for the slices that are scored, so each
#: instance is parsed once and only scored pixels are read (measured: a second, full read of
#: each scored instance cost ~40 % more CPU for reading than this).
_DEFER_BYTES = 4096


#: What one scan of a file reads: the selection header's attributes and the pixel layout,
#: and where the pixel data and any functional groups lie.
_SCAN_VALUES = SCANNED_TAGS | LAYOUT_TAGS
_SCAN_PLACES = PRESENCE_TAGS | {PIXEL_DATA_TAG}


def _read(ref: InstanceRef) -> tuple[InstanceHeader, PixelSource]:
    """An instance's selection header, and where its pixels are.

    A single-frame native little-endian instance (what MR scanners send) is read by a header
    scan (:func:`scanwatch.dicom_scan.scan_file`): its selection attributes and the place of its
    pixel data, with no ``Dataset`` built. Anything else, or anything the scan's reading is not
    sure of, is parsed by pydicom with the pixel data left in the file."""
    path = path_of(ref.storage_uri)
    try:
        scanned = scan_file(path, _SCAN_VALUES, _SCAN_PLACES)
        header = read_selection_header(ScannedAttributes(scanned.values, scanned.places))
        native = native_from_scan(scanned.transfer_syntax, scanned.values, scanned.places)
        if native is not None:
            return header, native
    except (OSError, ValueError):  # unreadable, truncated, not scanned: pydicom decides
        pass
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise UnusableStudy(f"cannot read instance {ref.SOPInstanceUID}: {exc}") from exc
    return read_selection_header(ds), ds


def _full_header(source: PixelSource, path: Path) -> InstanceHeader:
    """The whole header (patient and study facts too) of the instance a result describes."""
    if isinstance(source, Dataset):
        return read_header(source)
    try:
        return read_header(pydicom.dcmread(path, stop_before_pixels=True))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise UnusableStudy(f"cannot read instance at {path.name}: {exc}") from exc


def _frames_of(ref: InstanceRef, header: InstanceHeader) -> list[Frame]:
    return [
        Frame(ref, g.index, g.position, g.slope, g.intercept, g.located, g.thickness)
        for g in header.frames
    ]


def _order(frame: Frame) -> tuple[float, str, int]:
    """Along the slice normal; images at one position in a fixed order (UID, frame)."""
    return frame.position, frame.ref.SOPInstanceUID, -1 if frame.index is None else frame.index


def slices_to_score(frames: list[Frame], max_gap_mm: float | None = None) -> list[Frame]:
    """The images of a series to score, ordered along the slice normal (see the module's
    docstring): all of them, or with ``max_gap_mm`` a subset leaving no unscanned gap wider
    than that between neighbours.

    The subset is greedy: from each scored slice, the farthest slice still within the gap is
    scored next (the next slice when even that one is farther: the volume has a real gap
    there), and the last slice is always scored.
    """
    ordered = sorted(frames, key=_order)
    if max_gap_mm is None or len(ordered) < 3 or not all(f.located for f in ordered):
        return ordered

    def gap(a: Frame, b: Frame) -> float:
        return b.position - a.position - ((a.thickness or 0.0) + (b.thickness or 0.0)) / 2

    chosen = [0]
    while (i := chosen[-1]) < len(ordered) - 1:
        j = i + 1
        while j + 1 < len(ordered) and gap(ordered[i], ordered[j + 1]) <= max_gap_mm:
            j += 1
        chosen.append(j)
    return [ordered[i] for i in chosen]


def read_instances(refs: list[InstanceRef]) -> list[tuple[InstanceHeader, PixelSource]]:
    """Each instance's selection header (:func:`~inference_worker.header.read_selection_header`)
    and where its pixels are (see :func:`_read`), in ``refs``' order: the study's one read of
    each header."""
    return [_read(ref) for ref in refs]


def choose_series(
    refs: list[InstanceRef],
    rules: SelectionRules | None = None,
    read: list[tuple[InstanceHeader, PixelSource]] | None = None,
) -> ChosenSeries:
    """Choose the series to score by ``rules`` and, with :func:`slices_to_score`, its slices,
    from each instance's header (``read``: :func:`read_instances` of ``refs``, read here when
    not given; pixel data is left in the file)."""
    rules = rules or SelectionRules()
    by_series: dict[str, list[tuple[InstanceRef, InstanceHeader]]] = defaultdict(list)
    sources: dict[str, PixelSource] = {}
    for ref, (header, source) in zip(
        refs, read_instances(refs) if read is None else read, strict=True
    ):
        if header.Modality == "MR":
            by_series[ref.SeriesInstanceUID].append((ref, header))
            sources[ref.SOPInstanceUID] = source
    if not by_series:
        raise UnusableStudy("no MR series in the study")

    frames = {
        uid: [f for ref, header in members for f in _frames_of(ref, header)]
        for uid, members in by_series.items()
    }
    pattern = re.compile(rules.description_pattern, re.I) if rules.description_pattern else None

    def described(uid: str) -> bool:
        description = by_series[uid][0][1].SeriesDescription or ""
        return bool(pattern and pattern.search(description))

    candidates = [
        uid
        for uid in by_series
        if len(frames[uid]) >= rules.min_slices
        and rules.orientation in ("any", by_series[uid][0][1].orientation)
    ]
    if not candidates:
        raise UnusableStudy(
            f"no MR series matches the selection rules (at least {rules.min_slices} images, "
            f"orientation {rules.orientation})"
        )
    series_uid = max(candidates, key=lambda uid: (described(uid), len(frames[uid])))
    members = by_series[series_uid]
    ordered = sorted(frames[series_uid], key=_order)
    chosen = slices_to_score(ordered, rules.max_gap_mm)
    middle = members[len(members) // 2][0]
    return ChosenSeries(
        # The patient and study facts: of one instance.
        header=_full_header(sources[middle.SOPInstanceUID], path_of(middle.storage_uri)),
        SeriesInstanceUID=series_uid,
        number_of_instances=len(members),
        number_of_series=len({r.SeriesInstanceUID for r in refs}),
        study_instance_count=len(refs),
        frames=tuple(chosen),
        sources={f.ref.SOPInstanceUID: sources[f.ref.SOPInstanceUID] for f in ordered},
        series_frames=tuple(ordered) if len(chosen) < len(ordered) else (),
    )


def pixel_work(
    chosen: ChosenSeries, frames: tuple[Frame, ...] | None = None
) -> list[InstancePixels]:
    """What the decoders need to make the model input rows of ``frames`` (default: the chosen
    slices, ``chosen.frames``) (:func:`inference_worker.pixels.decode_and_resize`), row by row
    in their order."""
    frames = chosen.frames if frames is None else frames
    return describe(
        chosen.sources,
        {f.ref.SOPInstanceUID: str(path_of(f.ref.storage_uri)) for f in frames},
        [(f.ref.SOPInstanceUID, f.index, f.slope, f.intercept) for f in frames],
    )


@dataclass(frozen=True)
class ContextPlan:
    """Which images to decode for ``neighbours`` inputs, and how to stack them: scored slice
    ``i`` is ``(decoded[below[i]], decoded[rows[i]], decoded[above[i]])``."""

    frames: tuple[Frame, ...]  # to decode, in order along the normal
    rows: tuple[int, ...]
    below: tuple[int, ...]
    above: tuple[int, ...]


def _key(frame: Frame) -> tuple[str, int | None]:
    return frame.ref.SOPInstanceUID, frame.index


def context_plan(chosen: ChosenSeries) -> ContextPlan:
    """The scored slices and their neighbours in the series (see the module's docstring)."""
    ordered = chosen.series_frames or chosen.frames
    at = {_key(f): i for i, f in enumerate(ordered)}
    last = len(ordered) - 1
    scored = [at[_key(f)] for f in chosen.frames]
    wanted = sorted({j for i in scored for j in (max(i - 1, 0), i, min(i + 1, last))})
    row = {j: k for k, j in enumerate(wanted)}
    return ContextPlan(
        frames=tuple(ordered[j] for j in wanted),
        rows=tuple(row[i] for i in scored),
        below=tuple(row[max(i - 1, 0)] for i in scored),
        above=tuple(row[min(i + 1, last)] for i in scored),
    )


def with_context(plan: ContextPlan, grey: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The ``neighbours`` model input of the plan's decoded grey images ``grey``."""
    return neighbour_channels(grey, plan.rows, plan.below, plan.above)


def selected(chosen: ChosenSeries, images: npt.NDArray[np.float32]) -> SelectedSeries:
    """The chosen series with its model input ``images`` (one row per chosen frame)."""
    return SelectedSeries(
        header=chosen.header,
        SeriesInstanceUID=chosen.SeriesInstanceUID,
        number_of_instances=chosen.number_of_instances,
        number_of_series=chosen.number_of_series,
        study_instance_count=chosen.study_instance_count,
        images=images,
        slices=tuple(
            SourceSlice(f.ref.SOPInstanceUID, path_of(f.ref.storage_uri), f.index)
            for f in chosen.frames
        ),
    )


def prepare_series(
    chosen: ChosenSeries, image_size: int, context: str = NO_CONTEXT
) -> SelectedSeries:
    """Decode and preprocess the chosen slices into the model's input (for a model trained
    with ``context``), in this thread."""
    if context == NEIGHBOURS:
        plan = context_plan(chosen)
        decoded = decode_and_resize(pixel_work(chosen, plan.frames), image_size)
        grey = into_grey([decoded], len(plan.frames), image_size)
        return selected(chosen, with_context(plan, grey))
    decoded = decode_and_resize(pixel_work(chosen), image_size)
    return selected(chosen, into_rgb([decoded], len(chosen.frames), image_size))


def select_series(
    refs: list[InstanceRef],
    image_size: int,
    rules: SelectionRules | None = None,
    context: str = NO_CONTEXT,
) -> SelectedSeries:
    """:func:`choose_series` then :func:`prepare_series`: the chosen slices as model input."""
    return prepare_series(choose_series(refs, rules), image_size, context)
