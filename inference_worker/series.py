"""Read a ready study from the file store, choose the MR series and slices to score, and turn
them into model input with the preprocessing that training uses."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from scanwatch.imaging import preprocess_slice
from schemas import InstanceRef

log = logging.getLogger(__name__)


class UnusableStudy(Exception):
    """The study cannot be scored (no MR series, unreadable files or pixels). Not transient."""


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
    slice_positions: list[float] = field(default_factory=list)


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


def _slice_position(ds: Dataset) -> float:
    """Position along the slice normal (ImagePositionPatient · normal), else InstanceNumber."""
    try:
        row, col = (
            np.array(ds.ImageOrientationPatient[:3]),
            np.array(ds.ImageOrientationPatient[3:]),
        )
        return float(np.dot(np.cross(row, col), np.array(ds.ImagePositionPatient, dtype=float)))
    except (AttributeError, ValueError, TypeError):
        return float(getattr(ds, "InstanceNumber", 0) or 0)


def _frames(ds: Dataset) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


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
                d = DA(date)
                t = TM(getattr(ds, time_kw, None) or "000000")
                return datetime.combine(d, t)
            except ValueError:
                continue
    return None


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {n // 2})


def select_series(refs: list[InstanceRef], image_size: int, max_slices: int) -> SelectedSeries:
    """Choose the MR series with the most images and preprocess up to ``max_slices`` of them.

    Single-frame series are ordered along the slice normal; a multi-frame (Enhanced MR)
    instance contributes its frames in stored order.
    """
    headers = [(ref, _read_header(ref)) for ref in refs]
    by_series: dict[str, list[tuple[InstanceRef, Dataset]]] = defaultdict(list)
    for ref, ds in headers:
        if getattr(ds, "Modality", None) == "MR":
            by_series[ref.SeriesInstanceUID].append((ref, ds))
    if not by_series:
        raise UnusableStudy("no MR series in the study")
    series_uid, members = max(by_series.items(), key=lambda kv: sum(_frames(ds) for _, ds in kv[1]))
    members.sort(key=lambda m: _slice_position(m[1]))

    # (instance, frame index or None) for every image of the series, in order.
    images: list[tuple[InstanceRef, int | None]] = []
    for ref, ds in members:
        n = _frames(ds)
        images.extend((ref, i if n > 1 else None) for i in range(n))
    chosen = [images[i] for i in evenly_spaced(len(images), max_slices)]

    inputs = np.stack([_load_image(ref, frame, image_size) for ref, frame in chosen])
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


def _load_image(ref: InstanceRef, frame: int | None, image_size: int) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path_of(ref.storage_uri))
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the study unusable
        raise UnusableStudy(f"cannot decode pixels of {ref.SOPInstanceUID}: {exc}") from exc
    if frame is not None:
        pixels = pixels[frame]
    if pixels.ndim != 2:
        raise UnusableStudy(f"instance {ref.SOPInstanceUID} is not greyscale 2-D: {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return preprocess_slice(pixels, image_size, slope, intercept)
