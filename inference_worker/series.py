"""Read a ready study from the file store, choose the MR series and slices to score, and turn
them into model input with the preprocessing that training uses.

Single-frame series (MR Image Storage) and multi-frame instances (Enhanced MR Image Storage)
are both handled: a multi-frame instance's frames are ordered by their Plane Position and
rescaled with their own Pixel Value Transformation (PS3.3 C.7.6.16), falling back to the shared
functional groups and then to the top-level attributes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from scanwatch.imaging import preprocess_slice
from schemas import InstanceRef

ORIENTATIONS = ("any", "axial", "coronal", "sagittal")
# Patient axis (LPS) that the slice normal points along, per orientation.
_NORMAL_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


class UnusableStudy(Exception):
    """The study cannot be scored (no MR series, unreadable files or pixels). Not transient."""


@dataclass(frozen=True)
class SelectionRules:
    """Which series of a study is scored.

    Candidates are the MR series with at least ``min_slices`` images in the wanted
    ``orientation``; among them a series whose SeriesDescription matches
    ``description_pattern`` (a case-insensitive regular expression) wins, then the one with the
    most images.
    """

    description_pattern: str | None = None
    min_slices: int = 1
    orientation: str = "any"

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen for scoring, its model input and the header facts FHIR needs."""

    header: Dataset  # header of one instance of the series (no pixel data)
    SeriesInstanceUID: str
    number_of_instances: int
    number_of_series: int
    study_instance_count: int
    images: np.ndarray  # float32 (n, size, size, 3)
    acquired: datetime | None = None


def path_of(storage_uri: str) -> Path:
    """The local path of a ``file://`` storage URI."""
    parsed = urlparse(storage_uri)
    if parsed.scheme != "file":
        raise UnusableStudy(f"unsupported storage URI scheme {parsed.scheme!r}")
    return Path(unquote(parsed.path))


def _read_header(ref: InstanceRef) -> Dataset:
    try:
        return pydicom.dcmread(path_of(ref.storage_uri), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise UnusableStudy(f"cannot read instance {ref.SOPInstanceUID}: {exc}") from exc


def _group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional group item ``sequence`` of frame ``index`` (per-frame, else shared)."""
    for groups, i in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > i and sequence in items[i] and items[i][sequence].value:
            return items[i][sequence].value[0]
    return None


def _normal(orientation: object) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in orientation], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return np.cross(values[:3], values[3:6]) if values.size == 6 else None


def _position(normal: np.ndarray | None, position: object, fallback: float) -> float:
    """Position along the slice normal (ImagePositionPatient · normal), else ``fallback``."""
    try:
        point = np.array([float(v) for v in position], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return fallback
    return float(np.dot(normal, point)) if normal is not None and point.size == 3 else fallback


def _rescale(item: Dataset | None, ds: Dataset) -> tuple[float, float]:
    source = item if item is not None and "RescaleSlope" in item else ds
    slope = float(getattr(source, "RescaleSlope", 1) or 1)
    intercept = float(getattr(source, "RescaleIntercept", 0) or 0)
    return slope, intercept


def frames_of(ref: InstanceRef, ds: Dataset) -> list[Frame]:
    """Every image of an instance with its position along the slice normal and its rescale."""
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        normal = _normal(getattr(ds, "ImageOrientationPatient", None))
        fallback = float(getattr(ds, "InstanceNumber", 0) or 0)
        position = _position(normal, getattr(ds, "ImagePositionPatient", None), fallback)
        return [Frame(ref, None, position, *_rescale(None, ds))]
    frames = []
    for i in range(count):
        plane = _group(ds, i, "PlaneOrientationSequence")
        normal = _normal(getattr(plane, "ImageOrientationPatient", None))
        place = _group(ds, i, "PlanePositionSequence")
        position = _position(normal, getattr(place, "ImagePositionPatient", None), float(i))
        transform = _group(ds, i, "PixelValueTransformationSequence")
        # A one-frame instance decodes to a 2-D array: no frame index to pick.
        frames.append(Frame(ref, i if count > 1 else None, position, *_rescale(transform, ds)))
    return frames


def orientation_of(ds: Dataset) -> str:
    """axial, coronal or sagittal from the slice normal's dominant patient axis ("any" if
    the header does not say)."""
    orientation = getattr(ds, "ImageOrientationPatient", None)
    if orientation is None:
        plane = _group(ds, 0, "PlaneOrientationSequence")
        orientation = getattr(plane, "ImageOrientationPatient", None)
    normal = _normal(orientation)
    if normal is None:
        return "any"
    return _NORMAL_AXIS[int(np.argmax(np.abs(normal)))]


def _acquired(ds: Dataset) -> datetime | None:
    """AcquisitionDateTime, else AcquisitionDate+Time, else SeriesDate+Time, else StudyDate+Time."""
    from pydicom.valuerep import DA, DT, TM

    if value := getattr(ds, "AcquisitionDateTime", None):
        try:
            return DT(value)
        except ValueError:
            pass
    for date_kw, time_kw in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        if date := getattr(ds, date_kw, None):
            try:
                return datetime.combine(DA(date), TM(getattr(ds, time_kw, None) or "000000"))
            except ValueError:
                continue
    return None


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {n // 2})


def select_series(
    refs: list[InstanceRef],
    image_size: int,
    max_slices: int,
    rules: SelectionRules | None = None,
) -> SelectedSeries:
    """Choose the series to score by ``rules`` and preprocess up to ``max_slices`` of its
    images, spread evenly along the slice normal."""
    rules = rules or SelectionRules()
    by_series: dict[str, list[tuple[InstanceRef, Dataset]]] = defaultdict(list)
    for ref in refs:
        ds = _read_header(ref)
        if getattr(ds, "Modality", None) == "MR":
            by_series[ref.SeriesInstanceUID].append((ref, ds))
    if not by_series:
        raise UnusableStudy("no MR series in the study")

    frames = {
        uid: [f for ref, ds in members for f in frames_of(ref, ds)]
        for uid, members in by_series.items()
    }
    pattern = re.compile(rules.description_pattern, re.I) if rules.description_pattern else None

    def described(uid: str) -> bool:
        description = str(getattr(by_series[uid][0][1], "SeriesDescription", "") or "")
        return bool(pattern and pattern.search(description))

    candidates = [
        uid
        for uid in by_series
        if len(frames[uid]) >= rules.min_slices
        and rules.orientation in ("any", orientation_of(by_series[uid][0][1]))
    ]
    if not candidates:
        raise UnusableStudy(
            f"no MR series matches the selection rules (at least {rules.min_slices} images, "
            f"orientation {rules.orientation})"
        )
    series_uid = max(candidates, key=lambda uid: (described(uid), len(frames[uid])))
    members = by_series[series_uid]
    ordered = sorted(frames[series_uid], key=lambda f: f.position)
    chosen = [ordered[i] for i in evenly_spaced(len(ordered), max_slices)]
    inputs = np.stack(_load_images(chosen, image_size))
    header = members[len(members) // 2][1]
    return SelectedSeries(
        header=header,
        SeriesInstanceUID=series_uid,
        number_of_instances=len(members),
        number_of_series=len({r.SeriesInstanceUID for r in refs}),
        study_instance_count=len(refs),
        images=inputs,
        acquired=_acquired(header),
    )


def _load_images(frames: list[Frame], image_size: int) -> list[np.ndarray]:
    """Decode each chosen image once per instance (a multi-frame instance is read once)."""
    pixels_by_instance: dict[str, np.ndarray] = {}
    images = []
    for frame in frames:
        uid = frame.ref.SOPInstanceUID
        if uid not in pixels_by_instance:
            try:
                pixels_by_instance[uid] = pydicom.dcmread(
                    path_of(frame.ref.storage_uri)
                ).pixel_array
            except Exception as exc:  # noqa: BLE001 - any decoding failure makes it unusable
                raise UnusableStudy(f"cannot decode pixels of {uid}: {exc}") from exc
        pixels = pixels_by_instance[uid]
        if frame.index is not None:
            pixels = pixels[frame.index]
        if pixels.ndim != 2:
            raise UnusableStudy(f"instance {uid} is not greyscale 2-D: {pixels.shape}")
        images.append(preprocess_slice(pixels, image_size, frame.slope, frame.intercept))
    return images
