"""The DICOM header facts the worker uses, read once per instance into a typed value.

Series selection (modality, description, orientation, frame geometry), the scoring result and
the FHIR builders (patient, study and series attributes, dates in the right time zone) all read
:class:`InstanceHeader`, never a pydicom ``Dataset``. DICOM keywords are kept verbatim.

Frame geometry covers single-frame instances (MR Image Storage) and multi-frame ones (Enhanced
MR Image Storage): a multi-frame instance's frames are placed by their Plane Position and
rescaled with their own Pixel Value Transformation (PS3.3 C.7.6.16), falling back to the shared
functional groups and then to the top-level attributes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

ORIENTATIONS = ("any", "axial", "coronal", "sagittal")
# Patient axis (LPS) that the slice normal points along, per orientation.
_NORMAL_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass(frozen=True)
class FrameGeometry:
    """Where one image of an instance lies and how its stored values are rescaled."""

    index: int | None  # frame index in a multi-frame instance; None for a 2-D pixel array
    position: float  # along the slice normal (ImagePositionPatient · normal), else a fallback
    slope: float
    intercept: float
    #: Whether ``position`` comes from ImagePositionPatient and ImageOrientationPatient (False:
    #: the InstanceNumber or frame index stands in for it, not a distance).
    located: bool = True
    #: SliceThickness in mm (per frame in Pixel Measures for a multi-frame instance); None if
    #: the header does not say.
    thickness: float | None = None


@dataclass(frozen=True)
class InstanceHeader:
    """One instance's header (no pixel data), as the worker needs it."""

    Modality: str | None
    frames: tuple[FrameGeometry, ...]
    orientation: str  # axial, coronal, sagittal, or "any" when the header does not say
    PatientID: str = ""
    IssuerOfPatientID: str | None = None
    PatientName: str | None = None
    PatientSex: str | None = None
    PatientBirthDate: date | None = None
    AccessionNumber: str | None = None
    StudyDescription: str | None = None
    SeriesDescription: str | None = None
    SeriesNumber: int | None = None
    started: datetime | None = None  # StudyDate + StudyTime
    acquired: datetime | None = None  # see :func:`acquisition_datetime`
    timezone: tzinfo = UTC  # TimezoneOffsetFromUTC; naive datetimes above are read in it


def read_header(ds: Dataset) -> InstanceHeader:
    """The :class:`InstanceHeader` of a dataset (its pixel data is not read: it may have been
    read with ``stop_before_pixels=True`` or with the pixel data deferred)."""
    series_number = getattr(ds, "SeriesNumber", None)
    return dataclasses.replace(
        read_selection_header(ds),
        PatientID=str(getattr(ds, "PatientID", "") or ""),
        IssuerOfPatientID=_text(ds, "IssuerOfPatientID"),
        PatientName=_text(ds, "PatientName"),
        PatientSex=_text(ds, "PatientSex"),
        PatientBirthDate=_date(getattr(ds, "PatientBirthDate", None)),
        AccessionNumber=_text(ds, "AccessionNumber"),
        StudyDescription=_text(ds, "StudyDescription"),
        SeriesNumber=int(series_number) if series_number not in (None, "") else None,
        started=_study_start(ds),
        acquired=acquisition_datetime(ds),
        timezone=dicom_timezone(getattr(ds, "TimezoneOffsetFromUTC", None)),
    )


def read_selection_header(ds: Dataset | ScannedAttributes) -> InstanceHeader:
    """What series selection reads of every instance: Modality, SeriesDescription, the frames'
    geometry and the orientation; the other fields are left at their defaults. The patient and
    study facts are read (:func:`read_header`) only of the one instance a result describes:
    converting them for every instance was a third of the header's CPU."""
    modality = getattr(ds, "Modality", None)
    return InstanceHeader(
        Modality=str(modality) if modality is not None else None,
        frames=tuple(frame_geometry(ds)),
        orientation=orientation_of(ds),
        SeriesDescription=_text(ds, "SeriesDescription"),
    )


class NotScanned(ValueError):
    """A header that :class:`ScannedAttributes` does not read as pydicom would (a multi-frame
    or enhanced instance, another character set, a value of an unexpected form): the caller
    reads it with pydicom."""


#: What :func:`read_selection_header` reads of a top-level dataset, by keyword: (tag, value
#: representation as :class:`ScannedAttributes` decodes it).
_SCANNED = {
    "SpecificCharacterSet": (0x00080005, "CS"),
    "Modality": (0x00080060, "CS"),
    "SeriesDescription": (0x0008103E, "LO"),
    "SliceThickness": (0x00180050, "DS"),
    "InstanceNumber": (0x00200013, "IS"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"),
}
#: Sequences whose presence makes an instance enhanced (its geometry is in functional groups).
_FUNCTIONAL_GROUPS = frozenset({0x52009229, 0x52009230})
#: The top-level tags to scan for :class:`ScannedAttributes`: their values, and (for the
#: functional groups, sequences) their presence.
SCANNED_TAGS = frozenset(tag for tag, _ in _SCANNED.values())
PRESENCE_TAGS = _FUNCTIONAL_GROUPS
#: Specific Character Sets whose text :class:`ScannedAttributes` decodes ("" is the default).
_ENCODINGS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


class ScannedAttributes:
    """The attributes :func:`read_selection_header` reads of a single-frame instance, from the
    raw values of a header scan (:func:`scanwatch.dicom_scan.scan_file`) instead of a pydicom
    ``Dataset``, decoded as pydicom decodes them: text with trailing spaces and NULs removed, a
    DS or IS a number (a list of numbers when multi-valued), an empty value None. Building a
    ``Dataset`` of every element was most of the worker's CPU per study before Predict.

    Raises :class:`NotScanned` where that reading would not be pydicom's."""

    def __init__(self, values: dict[int, bytes], present: Iterable[int]) -> None:
        if _FUNCTIONAL_GROUPS.intersection(present):
            raise NotScanned("an enhanced instance: its geometry is in functional groups")
        self._values = values
        charset = self._raw("SpecificCharacterSet")
        encoding = _ENCODINGS.get((charset or b"").decode("ascii", "replace").strip(" \x00"))
        if encoding is None:
            raise NotScanned(f"Specific Character Set {charset!r}")
        self._encoding = encoding
        if self.get("NumberOfFrames") not in (None, 1):
            raise NotScanned("a multi-frame instance")

    def _raw(self, keyword: str) -> bytes | None:
        return self._values.get(_SCANNED[keyword][0])

    def __contains__(self, keyword: str) -> bool:
        return keyword in _SCANNED and self._raw(keyword) is not None

    def get(self, keyword: str, default: object = None) -> object:
        if keyword not in _SCANNED:
            return default  # never read here (functional groups: refused above)
        raw = self._raw(keyword)
        return default if raw is None else self._decoded(keyword, raw)

    def __getattr__(self, keyword: str) -> object:
        if keyword.startswith("_") or keyword not in self:
            raise AttributeError(keyword)
        return self.get(keyword)

    def _decoded(self, keyword: str, raw: bytes) -> object:
        vr = _SCANNED[keyword][1]
        try:
            text = raw.decode(self._encoding if vr == "LO" else "ascii")
        except UnicodeDecodeError:
            raise NotScanned(f"{keyword} is not {self._encoding}") from None
        text = text.rstrip(" \x00")
        if vr in ("CS", "LO"):
            if "\\" in text:
                raise NotScanned(f"{keyword} has several values")
            return text
        values = [value.strip(" ") for value in text.split("\\")]
        if values == [""]:
            return None
        try:
            numbers = [int(v) if vr == "IS" else float(v) for v in values]
        except ValueError:
            raise NotScanned(f"{keyword} is not a number: {text!r}") from None
        return numbers[0] if len(numbers) == 1 else numbers


def dicom_timezone(offset: str | None, default: tzinfo = UTC) -> tzinfo:
    """TimezoneOffsetFromUTC (``"+0100"``, ``"-0500"``) as a tzinfo; ``default`` when absent
    or malformed."""
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", (offset or "").strip())
    if match is None:
        return default
    sign = 1 if match[1] == "+" else -1
    return timezone(sign * timedelta(hours=int(match[2]), minutes=int(match[3])))


def frame_geometry(ds: Dataset | ScannedAttributes) -> list[FrameGeometry]:
    """Every image of an instance with its position along the slice normal and its rescale."""
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:
        normal = _normal(getattr(ds, "ImageOrientationPatient", None))
        fallback = float(getattr(ds, "InstanceNumber", 0) or 0)
        position = _position(normal, getattr(ds, "ImagePositionPatient", None))
        return [
            FrameGeometry(
                None,
                fallback if position is None else position,
                *_rescale(None, ds),
                located=position is not None,
                thickness=_thickness(ds),
            )
        ]
    frames = []
    for i in range(count):
        plane = _group(ds, i, "PlaneOrientationSequence")
        normal = _normal(getattr(plane, "ImageOrientationPatient", None))
        place = _group(ds, i, "PlanePositionSequence")
        position = _position(normal, getattr(place, "ImagePositionPatient", None))
        transform = _group(ds, i, "PixelValueTransformationSequence")
        measures = _group(ds, i, "PixelMeasuresSequence")
        # A one-frame instance decodes to a 2-D array: no frame index to pick.
        frames.append(
            FrameGeometry(
                i if count > 1 else None,
                float(i) if position is None else position,
                *_rescale(transform, ds),
                located=position is not None,
                thickness=_thickness(measures) or _thickness(ds),
            )
        )
    return frames


def orientation_of(ds: Dataset | ScannedAttributes) -> str:
    """axial, coronal or sagittal from the slice normal's dominant patient axis ("any" if
    the header does not say)."""
    orientation = getattr(ds, "ImageOrientationPatient", None)
    if orientation is None:
        plane = _group(ds, 0, "PlaneOrientationSequence")
        orientation = getattr(plane, "ImageOrientationPatient", None)
    normal = _normal(orientation)
    if normal is None:
        return "any"
    magnitudes = [abs(component) for component in normal]
    return _NORMAL_AXIS[magnitudes.index(max(magnitudes))]


def acquisition_datetime(ds: Dataset) -> datetime | None:
    """AcquisitionDateTime, else AcquisitionDate+Time, else SeriesDate+Time, else StudyDate+Time."""
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
        if day := getattr(ds, date_kw, None):
            try:
                return datetime.combine(DA(day), TM(getattr(ds, time_kw, None) or "000000"))
            except ValueError:
                continue
    return None


def _text(ds: Dataset | ScannedAttributes, keyword: str) -> str | None:
    value = getattr(ds, keyword, None)
    return str(value) if value else None


def _date(value: object) -> date | None:
    try:
        return DA(value) if value else None
    except ValueError:
        return None


def _study_start(ds: Dataset) -> datetime | None:
    try:
        if day := DA(getattr(ds, "StudyDate", None) or None):
            return datetime.combine(day, TM(getattr(ds, "StudyTime", None) or "000000"))
    except (ValueError, TypeError):
        pass
    return None


def _group(ds: Dataset | ScannedAttributes, index: int, sequence: str) -> Dataset | None:
    """The functional group item ``sequence`` of frame ``index`` (per-frame, else shared)."""
    if isinstance(ds, ScannedAttributes):
        return None  # it has no functional groups (refused otherwise)
    for groups, i in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > i and sequence in items[i] and items[i][sequence].value:
            item: Dataset = items[i][sequence].value[0]
            return item
    return None


def _floats(values: object) -> list[float] | None:
    try:
        return [float(v) for v in values]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None


_Vector = tuple[float, float, float]


def _normal(orientation: object) -> _Vector | None:
    """The slice normal: the cross product of ImageOrientationPatient's row and column
    directions, turned to point along its dominant patient axis (LPS: left, posterior, head),
    so that a series is ordered the same way whichever way its rows and columns run, as
    training orders its slices (plain floats: numpy's cross of two 3-vectors cost more than
    the rest of an instance's geometry)."""
    values = _floats(orientation)
    if values is None or len(values) != 6:
        return None
    (a1, a2, a3), (b1, b2, b3) = values[:3], values[3:]
    normal = a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1
    dominant = max(normal, key=abs)
    return normal if dominant >= 0 else (-normal[0], -normal[1], -normal[2])


def _position(normal: _Vector | None, position: object) -> float | None:
    """Position along the slice normal (ImagePositionPatient · normal); None if unknown."""
    point = _floats(position)
    if point is None or normal is None or len(point) != 3:
        return None
    return normal[0] * point[0] + normal[1] * point[1] + normal[2] * point[2]


def _thickness(item: Dataset | ScannedAttributes | None) -> float | None:
    """SliceThickness in mm if present, finite and positive."""
    try:
        value = float(getattr(item, "SliceThickness", None) or 0)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _rescale(item: Dataset | None, ds: Dataset | ScannedAttributes) -> tuple[float, float]:
    source = item if item is not None and "RescaleSlope" in item else ds
    slope = float(getattr(source, "RescaleSlope", 1) or 1)
    intercept = float(getattr(source, "RescaleIntercept", 0) or 0)
    return slope, intercept
