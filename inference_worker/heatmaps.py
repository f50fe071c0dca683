"""The Grad-CAM heatmaps of a scored study, stored beside it as a DICOM series.

What is stored: one **Secondary Capture** instance (highdicom ``SCImage``, MONOCHROME2, 8 bits)
per scored slice, in one new series of the same study. Each has the source slice's Rows and
Columns (the heatmap is mapped back through :func:`scanwatch.imaging.square_resize`: resized to
the padded square, the padding cropped), so a viewer lays it over the slice pixel for pixel;
pixel value 255 is the map's maximum (Grad-CAM of the slice's most probable class, see
:data:`schemas.model_signature.SALIENCY_OUTPUTS`). Each instance references its source slice
(``SourceImageSequence``, with ``ReferencedFrameNumber`` for a frame of a multi-frame instance)
and carries **that slice's class probabilities**, where the console reads them:

* private block ``SCANWATCH AI 1`` in group 0x0071 (PS3.5 §7.8.1): element ``xx10`` (LO,
  multi-valued) the class names, ``xx11`` (FD, multi-valued) their probabilities in the same
  order, ``xx12`` (LO) the explained class, ``xx13`` (LO) model name and ``xx14`` (IS) version;
* ``ImageComments``: the same in words, for any viewer.

Deterministic UIDs (redelivery never duplicates): the series UID is ``2.25.<UUIDv5>`` of
(StudyInstanceUID, model name, model version), each SOP Instance UID that of (series, source
SOPInstanceUID, frame). A file that is already in the store is left as it is; a new one is
written durably (:func:`scanwatch.durable.atomic_files`: each file under a temporary name and
fsync'd, then renamed; the folder fsync'd once for the series) under the store's layout
(:mod:`scanwatch.store_layout`).

How a series is built (:func:`write_heatmap_series`): highdicom builds the instance of the first
slice of each *template group* (:func:`build_instance`), and every other slice of the group is
that instance's encoded bytes with the elements that differ per slice (:class:`_Slice`)
encoded anew and put in their place (:class:`_Template`). A template group is the slices whose
source headers hold the same raw values of everything the instance copies from its source
(:data:`_TEMPLATE_TAGS`: patient, study, equipment, geometry): usually one per series. The test
``test_every_derived_instance_is_what_highdicom_builds`` holds each derived file byte for byte
to highdicom's. Building and encoding an instance with highdicom and pydicom costs ≈ 5 ms of
CPU (highdicom's per-attribute checks against the IOD tables, pydicom's generic encoder); a
derived instance's bytes ≈ 0.01 ms. What is left per slice (≈ 1.2 ms on the 2-core dev VM with
38 slices, `bench/heatmap.py`) is mostly the resize (:func:`to_source_geometry_stack`), the
file's fsync and the source's header scan; the template ≈ 6 ms once per group.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import highdicom
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, DT, TM
from pydicom.values import convert_DA_string, convert_DT_string, convert_TM_string, convert_UI
from scipy import sparse

from inference_worker.fhir_resources import HeatmapSeriesRef
from inference_worker.series import SourceSlice
from scanwatch import store_layout
from scanwatch.dicom_scan import scan_file
from scanwatch.durable import atomic_files, fsync_dir

#: Secondary Capture Image Storage, the SOP class of every heatmap instance.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: Root of the UUID-derived UIDs (PS3.5 §B.2).
UUID_UID_ROOT = "2.25."
_NAMESPACE = uuid.UUID("5c1b3b9e-1f0e-4c55-9a0e-6b7f4f1f2a17")
#: Private creator of the per-slice AI values (group 0x0071).
PRIVATE_CREATOR = "SCANWATCH AI 1"
PRIVATE_GROUP = 0x0071
#: Element offsets in the private block.
CLASS_NAMES_ELEMENT = 0x10
PROBABILITIES_ELEMENT = 0x11
EXPLAINED_CLASS_ELEMENT = 0x12
MODEL_NAME_ELEMENT = 0x13
MODEL_VERSION_ELEMENT = 0x14
#: Heatmap series: a SeriesNumber far from a scanner's own.
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "AI Grad-CAM heatmaps"
MANUFACTURER = "scanwatch"


#: General Study attributes (PS3.3 C.7.2.1) a heatmap copies from its source slice.
STUDY_ATTRIBUTES = ("StudyDescription", "AccessionNumber", "StudyID", "ReferringPhysicianName")


def uuid_uid(*parts: str) -> str:
    """A DICOM UID under ``2.25`` from a UUIDv5 of ``parts``: the same parts, the same UID."""
    return UUID_UID_ROOT + str(uuid.uuid5(_NAMESPACE, "|".join(parts)).int)


def heatmap_series_uid(study_uid: str, model_name: str, model_version: int) -> str:
    """The heatmap series of one (study, model version)."""
    return uuid_uid("heatmaps", study_uid, model_name, str(model_version))


@dataclass(frozen=True)
class HeatmapSeries:
    """The heatmap series of one scored study, as written (or found) in the store."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUIDs: tuple[str, ...]
    SOPClassUID: str
    written: int  # instances written now (0 when a redelivery found them all)


def store_root_of(instance_path: Path) -> Path:
    """The store root of a stored instance's path (``<root>/<Study>/<Series>/<file>``)."""
    return Path(instance_path).parents[2]


def _sop_uid(series_uid: str, source: SourceSlice) -> str:
    return uuid_uid(series_uid, source.SOPInstanceUID, str(source.frame))


def as_reference(series: HeatmapSeries) -> HeatmapSeriesRef:
    """What the FHIR resources say about a stored heatmap series."""
    return HeatmapSeriesRef(
        SeriesInstanceUID=series.SeriesInstanceUID,
        SOPInstanceUIDs=series.SOPInstanceUIDs,
        SOPClassUID=series.SOPClassUID,
        SeriesNumber=SERIES_NUMBER,
        SeriesDescription=SERIES_DESCRIPTION,
    )


def present_series(
    store_root: Path,
    study_uid: str,
    sources: Sequence[SourceSlice],
    model_name: str,
    model_version: int,
) -> HeatmapSeries | None:
    """The heatmap series of these slices if every instance of it is in the store already (a
    redelivered study), else ``None``."""
    if not sources:
        return None
    series_uid = heatmap_series_uid(study_uid, model_name, model_version)
    folder = store_layout.series_folder(store_root, study_uid, series_uid)
    uids = tuple(_sop_uid(series_uid, source) for source in sources)
    if not all((folder / store_layout.instance_file_name(uid)).is_file() for uid in uids):
        return None
    return HeatmapSeries(study_uid, series_uid, uids, SECONDARY_CAPTURE, written=0)


def _zoom_weights(
    size: int, side: int, start: int, count: int
) -> tuple[
    npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """Samples ``start`` to ``start + count`` of the linear interpolation of ``size`` samples to
    ``side`` (``side`` ≠ ``size``) as :func:`scipy.ndimage.zoom` (``order=1``) computes them:
    output sample ``o`` lies at ``o·(size−1)/(side−1)`` of the input (its ``grid_mode`` False),
    and one that rounding puts past the last input sample is 0 (its ``constant`` mode). Each
    is ``low·w_low + high·w_high``: (low, high, w_low, w_high)."""
    factor = (size - 1) / (side - 1) if side > 1 else 1.0
    where = np.arange(start, start + count, dtype=np.float64) * factor
    inside = where <= size - 1
    low = np.minimum(np.floor(where), size - 1).astype(np.intp)
    fraction = where - low
    high = np.minimum(low + 1, size - 1)
    return low, high, np.where(inside, 1.0 - fraction, 0.0), np.where(inside, fraction, 0.0)


def to_source_geometry_stack(
    heatmaps: npt.NDArray[np.float32], rows: int, cols: int
) -> npt.NDArray[np.float32]:
    """Undo :func:`scanwatch.imaging.square_resize` for N heatmaps of one slice geometry: each
    model's S×S map resized (bilinear) to the zero-padded square of the source slice, the
    padding cropped; N×rows×cols.

    The same numbers as ``scipy.ndimage.zoom(heatmap, side / S, order=1)`` then the crop (the
    tests hold them to it), computed for the kept rows and columns only and for the whole
    stack at once: along the rows by gathering, along the columns by one sparse product.
    ndimage's per-pixel loop was ≈ 1 ms of CPU per 233×197 slice, this ≈ 0.2 ms."""
    count, size, width = heatmaps.shape
    if size != width:
        raise ValueError(f"heatmaps are {size}×{width}: square maps expected")
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    if side == size:  # nothing to resize: the crop of the padding
        return np.asarray(heatmaps[:, top : top + rows, left : left + cols], dtype=np.float32)
    maps = np.asarray(heatmaps, dtype=np.float64).reshape(count * size, size)
    low, high, w_low, w_high = _zoom_weights(size, side, left, cols)
    across = np.take(maps, low, axis=1)
    across *= w_low
    across += np.take(maps, high, axis=1) * w_high  # (N·S) × cols
    low, high, w_low, w_high = _zoom_weights(size, side, top, rows)
    down = sparse.csr_array(
        (
            np.concatenate([w_low, w_high]),
            (np.tile(np.arange(rows), 2), np.concatenate([low, high])),
        ),
        shape=(rows, size),
    )
    # (rows × S) · (S × N·cols): every slice's columns side by side.
    mapped = down @ across.reshape(count, size, cols).transpose(1, 0, 2).reshape(size, count * cols)
    return mapped.reshape(rows, count, cols).transpose(1, 0, 2).astype(np.float32)


def to_source_geometry(heatmap: npt.NDArray[np.float32], rows: int, cols: int) -> npt.NDArray:
    """:func:`to_source_geometry_stack` of one heatmap."""
    return to_source_geometry_stack(np.asarray(heatmap)[np.newaxis], rows, cols)[0]


def heatmap_pixels(mapped: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """The stored pixel values of mapped heatmaps: 255 is 1.0."""
    return np.clip(np.rint(mapped * 255.0), 0, 255).astype(np.uint8)


#: PS3.3 C.7.6.1.1.1: the patient direction a positive step along x, y or z points to.
_DIRECTIONS = (("L", "R"), ("P", "A"), ("H", "F"))


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """PatientOrientation (row, column directions) of the source slice, from its
    ImageOrientationPatient (the dominant axis of each direction cosine), else its own
    PatientOrientation, else the axial default ("L", "P")."""
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        letters = []
        for vector in (cosines[:3], cosines[3:]):
            axis = int(np.argmax(np.abs(np.asarray(vector, dtype=float))))
            letters.append(_DIRECTIONS[axis][0 if float(vector[axis]) > 0 else 1])
        return letters[0], letters[1]
    given = source.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    return "L", "P"


def _private_values(
    ds: Dataset,
    class_names: Sequence[str],
    probabilities: Sequence[float],
    model_name: str,
    model_version: int,
) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    explained, comments = _explained(class_names, probabilities, model_name, model_version)
    block.add_new(CLASS_NAMES_ELEMENT, "LO", list(class_names))
    block.add_new(PROBABILITIES_ELEMENT, "FD", [float(p) for p in probabilities])
    block.add_new(EXPLAINED_CLASS_ELEMENT, "LO", explained)
    block.add_new(MODEL_NAME_ELEMENT, "LO", model_name)
    block.add_new(MODEL_VERSION_ELEMENT, "IS", str(model_version))
    ds.ImageComments = comments


def _explained(
    class_names: Sequence[str],
    probabilities: Sequence[float],
    model_name: str,
    model_version: int,
) -> tuple[str, str]:
    """The explained class (the slice's most probable) and the ImageComments saying it."""
    explained = class_names[int(np.argmax(probabilities))]
    words = ", ".join(f"{n} {p:.3f}" for n, p in zip(class_names, probabilities, strict=True))
    comments = (
        f"AI Grad-CAM of '{explained}' (not reviewed), {model_name} v{model_version}; "
        f"slice probabilities: {words}"
    )[:10240]
    return explained, comments


def slice_probabilities(ds: Dataset) -> dict[str, float]:
    """The class probabilities a heatmap instance carries (what the console reads)."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    names = block[CLASS_NAMES_ELEMENT].value
    values = block[PROBABILITIES_ELEMENT].value
    names = [names] if isinstance(names, str) else list(names)
    values = [values] if isinstance(values, float) else list(values)
    return dict(zip(names, (float(v) for v in values), strict=True))


def build_instance(
    source: Dataset,
    frame: int | None,
    heatmap: npt.NDArray[np.float32],
    series_uid: str,
    instance_number: int,
    class_names: Sequence[str],
    probabilities: Sequence[float],
    model_name: str,
    model_version: int,
    created: datetime,
) -> Dataset:
    """One Secondary Capture heatmap of one source slice (``source`` read with its header),
    built by highdicom.

    Every date and time in it is ``created`` (the ready event's time, like the FHIR result's
    ``issued``), so the same study builds the same bytes."""
    rows, cols = int(source.Rows), int(source.Columns)
    mapped = to_source_geometry(np.asarray(heatmap, dtype=np.float32), rows, cols)
    return _highdicom_instance(
        source,
        frame,
        heatmap_pixels(mapped),
        series_uid,
        instance_number,
        class_names,
        probabilities,
        model_name,
        model_version,
        created,
    )


def _highdicom_instance(
    source: Dataset,
    frame: int | None,
    pixels: npt.NDArray[np.uint8],
    series_uid: str,
    instance_number: int,
    class_names: Sequence[str],
    probabilities: Sequence[float],
    model_name: str,
    model_version: int,
    created: datetime,
) -> Dataset:
    """:func:`build_instance` of the slice's pixel values already mapped."""
    sop_uid = uuid_uid(series_uid, str(source.SOPInstanceUID), str(frame))  # = _sop_uid
    spacing = source.get("PixelSpacing")
    image = highdicom.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom annotates this tuple[int, int]; PS3.3 PixelSpacing is DS (decimal) values.
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
        # Where the heatmap's rows and columns point: the slice's own (sagittal, coronal...).
        patient_orientation=patient_orientation(source),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    image.SeriesDescription = SERIES_DESCRIPTION
    # Study-level attributes highdicom leaves out: an instance of the study must not blank
    # what the study's index (QIDO-RS, the worklist) reads from its instances.
    for keyword in STUDY_ATTRIBUTES:
        if keyword not in image and source.get(keyword) not in (None, ""):
            setattr(image, keyword, source[keyword].value)
    image.ImageType = ["DERIVED", "SECONDARY", "HEATMAP"]
    image.DerivationDescription = "Grad-CAM saliency of an AI classifier"
    image.SourceImageSequence = _source_reference(source.SOPClassUID, source.SOPInstanceUID, frame)
    # Deterministic content: no clock reading of the build itself stays in the instance.
    day, moment = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
    for date_keyword, time_keyword in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        setattr(image, date_keyword, day)
        setattr(image, time_keyword, moment)
    for item in image.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S.%f%z")
    _private_values(image, class_names, probabilities, model_name, model_version)
    return image


def _source_reference(
    sop_class_uid: str, sop_instance_uid: str, frame: int | None
) -> DicomSequence:
    """SourceImageSequence: the source slice (and its frame, 1-based, in a multi-frame one)."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = sop_class_uid
    reference.ReferencedSOPInstanceUID = sop_instance_uid
    if frame is not None:
        reference.ReferencedFrameNumber = frame + 1
    return DicomSequence([reference])


_PIXEL_DATA = 0x7FE00010
_GROUP_LENGTH = 0x00020000
_MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
_SOP_INSTANCE_UID = 0x00080018
_SOURCE_IMAGE_SEQUENCE = 0x00082112
_INSTANCE_NUMBER = 0x00200013
_IMAGE_COMMENTS = 0x00204000
_REFERENCED_SOP_CLASS_UID = 0x00081150
_REFERENCED_SOP_INSTANCE_UID = 0x00081155
_REFERENCED_FRAME_NUMBER = 0x00081160
#: A Part 10 file's start (PS3.10 7.1): highdicom's preamble (zeros) and the prefix.
_PREAMBLE = b"\x00" * 128 + b"DICM"
#: Explicit VRs with a 4-byte length (PS3.5 7.1.2), of those written here.
_LONG_VRS = frozenset({b"OB", b"SQ"})
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_HEADER = struct.Struct("<HH2sHL")
_ITEM_HEADER = struct.Struct("<HHL")


@dataclass(frozen=True)
class _Slice:
    """What differs between two heatmap instances of one template group: their SOP Instance
    UID, instance number, source slice, probabilities (with the explained class and the
    ImageComments made of them) and pixels."""

    sop_uid: str
    number: int
    source_uid: str
    frame: int | None
    probabilities: list[float]
    explained: str
    comments: str
    pixels: npt.NDArray[np.uint8]


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr in _LONG_VRS:
        return _LONG_HEADER.pack(tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return _SHORT_HEADER.pack(tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _even(value: bytes, padding: bytes) -> bytes:
    return value + padding if len(value) % 2 else value


def _ascii(value: str, padding: bytes) -> bytes:
    """A UI (``\\x00``-padded), IS or CS value, as pydicom's writer encodes it."""
    return _even(value.encode(default_encoding), padding)


class _Template:
    """The heatmap instance highdicom built for one slice of a template group, encoded once by
    pydicom and kept in pieces, from which the Part 10 bytes of the group's other slices are
    made: its bytes with the elements of :class:`_Slice` (and the File Meta's
    MediaStorageSOPInstanceUID and group length) encoded for the slice in their place.

    Built, it checks that its own slice encoded this way gives pydicom's bytes back, so a
    change in what highdicom or pydicom writes stops the shortcut (``RuntimeError``: the
    series is then not written, and the worker counts a heatmap failure) instead of making
    other objects; the tests hold every derived instance to highdicom's."""

    def __init__(self, image: Dataset, own: _Slice, source: Dataset) -> None:
        self.first = _file_bytes(image)  # pydicom settles ambiguous VRs here (PixelData: OB)
        charset = image.get("SpecificCharacterSet", default_encoding)
        self.encodings = convert_encodings(charset)
        block = image.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        self.probabilities_tag = int(block.get_tag(PROBABILITIES_ELEMENT))
        self.explained_tag = int(block.get_tag(EXPLAINED_CLASS_ELEMENT))
        self.source_class = _ascii(str(source.SOPClassUID), b"\x00")
        varying = self._order = sorted(self._varying(own))
        # The template's own elements, encoded one by one as pydicom's writer encodes them,
        # in runs between the elements a slice replaces.
        self._runs: list[bytes] = []
        run: list[bytes] = []
        for tag, chunk in _encoded(image, charset):
            if tag in varying:
                self._runs.append(b"".join(run))
                run = []
            else:
                run.append(chunk)
        self._runs.append(b"".join(run))
        meta = _encoded(image.file_meta, default_encoding)
        self._meta_before = b"".join(
            c for t, c in meta if _GROUP_LENGTH < t < _MEDIA_STORAGE_SOP_INSTANCE_UID
        )
        self._meta_after = b"".join(c for t, c in meta if t > _MEDIA_STORAGE_SOP_INSTANCE_UID)
        if len(self._runs) != len(varying) + 1 or self.instance_bytes(own) != self.first:
            raise RuntimeError(
                "a heatmap instance derived from its template differs from what highdicom "
                "builds: what a slice changes in the instance is no longer what _Slice holds"
            )

    def _varying(self, values: _Slice) -> dict[int, bytes]:
        """The elements of one slice, as pydicom's writer encodes them."""
        reference = [
            _element(_REFERENCED_SOP_CLASS_UID, b"UI", self.source_class),
            _element(_REFERENCED_SOP_INSTANCE_UID, b"UI", _ascii(values.source_uid, b"\x00")),
        ]
        if values.frame is not None:
            reference.append(
                _element(_REFERENCED_FRAME_NUMBER, b"IS", _ascii(str(values.frame + 1), b" "))
            )
        item = b"".join(reference)
        item = _ITEM_HEADER.pack(0xFFFE, 0xE000, len(item)) + item
        probabilities = struct.pack(f"<{len(values.probabilities)}d", *values.probabilities)
        return {
            _SOP_INSTANCE_UID: _element(_SOP_INSTANCE_UID, b"UI", _ascii(values.sop_uid, b"\x00")),
            _SOURCE_IMAGE_SEQUENCE: _element(_SOURCE_IMAGE_SEQUENCE, b"SQ", item),
            _INSTANCE_NUMBER: _element(_INSTANCE_NUMBER, b"IS", _ascii(str(values.number), b" ")),
            _IMAGE_COMMENTS: _element(_IMAGE_COMMENTS, b"LT", self._text(values.comments)),
            self.probabilities_tag: _element(self.probabilities_tag, b"FD", probabilities),
            self.explained_tag: _element(self.explained_tag, b"LO", self._text(values.explained)),
            _PIXEL_DATA: _element(_PIXEL_DATA, b"OB", _even(values.pixels.tobytes(), b"\x00")),
        }

    def _text(self, value: str) -> bytes:
        """An LO or LT value in the instance's character set, as pydicom's writer encodes it."""
        return _even(encode_string(value, self.encodings), b" ")

    def instance_bytes(self, values: _Slice) -> bytes:
        """The Part 10 file of one slice of the group."""
        uid = _element(_MEDIA_STORAGE_SOP_INSTANCE_UID, b"UI", _ascii(values.sop_uid, b"\x00"))
        meta_length = len(self._meta_before) + len(uid) + len(self._meta_after)
        parts = [
            _PREAMBLE,
            _element(_GROUP_LENGTH, b"UL", struct.pack("<L", meta_length)),
            self._meta_before,
            uid,
            self._meta_after,
        ]
        varying = self._varying(values)
        for run, tag in zip(self._runs, self._order, strict=False):
            parts += (run, varying[tag])
        parts.append(self._runs[-1])
        return b"".join(parts)


def _encoded(ds: Dataset, charset: str | list[str]) -> list[tuple[int, bytes]]:
    """Each top-level element of ``ds`` encoded as pydicom's writer encodes it (Explicit VR
    Little Endian, ``write_data_element``), with its tag, in tag order; group lengths of the
    dataset left out as the writer leaves them out."""
    chunks = []
    for element in ds:
        tag = int(element.tag)
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, element, charset)
        chunks.append((tag, fp.getvalue()))
    return chunks


def _file_bytes(image: Dataset) -> bytes:
    """A dataset as pydicom writes it to a Part 10 file."""
    buffer = BytesIO()
    image.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


#: What a heatmap instance takes from its source slice's header, by keyword: what highdicom
#: 0.28's ``SCImage.from_ref_dataset`` copies (patient, study, character set) and reads
#: (``ContributingEquipment.for_image_acquisition``: SOP class, equipment), and what
#: :func:`_highdicom_instance` reads (study attributes, geometry, orientation). Slices whose
#: headers hold the same raw values of these (and the same transfer syntax) get the same
#: instance but for :class:`_Slice`: one template group.
_TEMPLATE_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Manufacturer",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "StationName",
    "StudyDescription",
    "InstitutionalDepartmentName",
    "ManufacturerModelName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "StudyInstanceUID",
    "StudyID",
    "PatientOrientation",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "PixelSpacing",
)
_TEMPLATE_TAGS = tuple(int(tag_for_keyword(k) or 0) for k in _TEMPLATE_KEYWORDS)
#: The acquisition date and time, which highdicom turns into the acquisition equipment's
#: ContributionDateTime and :func:`_highdicom_instance` then sets to the series' time: only
#: whether each is there and readable changes the instance, not its value (which usually
#: differs from slice to slice).
_ACQUISITION = {
    0x0008002A: (convert_DT_string, DT),  # AcquisitionDateTime
    0x00080022: (convert_DA_string, DA),  # AcquisitionDate
    0x00080032: (convert_TM_string, TM),  # AcquisitionTime
}
_SCANNED = frozenset(_TEMPLATE_TAGS) | frozenset(_ACQUISITION) | {_SOP_INSTANCE_UID}


def _readable(raw: bytes | None, tag: int) -> object:
    """Whether an acquisition date or time is absent (None), empty, readable (True) or not."""
    if raw is None:
        return None
    convert, parse = _ACQUISITION[tag]
    value = convert(raw, True)
    if value in ("", None):
        return ""
    try:
        parse(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _SourceFacts:
    """What the heatmap writer reads of a source instance for each slice of it."""

    group: tuple[object, ...]  # its template group (see _TEMPLATE_KEYWORDS)
    SOPInstanceUID: str  # as its header says
    header: Dataset | None = None  # when pydicom read it


def _source_facts(path: Path) -> _SourceFacts:
    """A header scan (:func:`scanwatch.dicom_scan.scan_file`) of the few values the group needs;
    pydicom where the scan does not read the file (another transfer syntax)."""
    try:
        scanned = scan_file(path, _SCANNED, frozenset())
        raw_uid = scanned.values[_SOP_INSTANCE_UID]
    except (ValueError, KeyError):  # not scanned, truncated, no SOPInstanceUID: pydicom says
        header = pydicom.dcmread(path, stop_before_pixels=True)
        syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
        return _SourceFacts(_group_of(header, syntax), str(header.SOPInstanceUID), header)
    group = _group_of(scanned.values, scanned.transfer_syntax)
    return _SourceFacts(group, str(convert_UI(raw_uid, True)))


def _group_of(header: dict[int, bytes] | Dataset, syntax: str) -> tuple[object, ...]:
    """The template group of a source: its transfer syntax, the raw values of
    :data:`_TEMPLATE_TAGS` (of a scan, or as pydicom read them: a value pydicom has converted
    already stands as its VR and text) and :func:`_readable` of the acquisition date and time.
    """
    raw: dict[int, object] = {}
    if isinstance(header, Dataset):
        for tag in _SCANNED:
            element = header.get_item(tag)
            if isinstance(element, DataElement):
                raw[tag] = (element.VR, str(element.value))
            elif element is not None:
                raw[tag] = element.value
    else:
        raw.update(header)
    readable = [
        _readable(value, tag) if isinstance(value := raw.get(tag), bytes | None) else value
        for tag in _ACQUISITION
    ]
    return (syntax, isinstance(header, Dataset), *(raw.get(t) for t in _TEMPLATE_TAGS), *readable)


#: Heatmaps mapped to their slices' geometry at a time (bounds the float64 stack's memory).
_CHUNK = 16


def write_heatmap_series(
    store_root: Path,
    study_uid: str,
    sources: Sequence[SourceSlice],
    heatmaps: npt.NDArray[np.float32],
    probabilities: npt.NDArray[np.float32],
    class_names: Sequence[str],
    model_name: str,
    model_version: int,
    created: datetime,
) -> HeatmapSeries:
    """Build and store the heatmap series of a study (blocking: run it in an executor).

    Instances already in the store (a redelivery) are not written again.
    """
    if not len(sources) == len(heatmaps) == len(probabilities):
        raise ValueError(
            f"{len(sources)} slices, {len(heatmaps)} heatmaps, {len(probabilities)} rows"
        )
    series_uid = heatmap_series_uid(study_uid, model_name, model_version)
    folder = store_layout.series_folder(store_root, study_uid, series_uid)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)
    sop_uids: list[str] = []
    missing: list[tuple[int, SourceSlice]] = []
    for index, source in enumerate(sources):
        sop_uid = _sop_uid(series_uid, source)
        sop_uids.append(sop_uid)
        if not (folder / store_layout.instance_file_name(sop_uid)).exists():
            missing.append((index, source))
    if missing:
        with atomic_files(folder) as files:
            for name, data in _instances(
                missing,
                heatmaps,
                probabilities,
                class_names,
                series_uid,
                model_name,
                model_version,
                created,
            ):
                files.write(name, data)
    return HeatmapSeries(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        SOPInstanceUIDs=tuple(sop_uids),
        SOPClassUID=SECONDARY_CAPTURE,
        written=len(missing),
    )


def _instances(
    slices: list[tuple[int, SourceSlice]],
    heatmaps: npt.NDArray[np.float32],
    probabilities: npt.NDArray[np.float32],
    class_names: Sequence[str],
    series_uid: str,
    model_name: str,
    model_version: int,
    created: datetime,
) -> Iterator[tuple[str, bytes]]:
    """(file name, Part 10 bytes) of the heatmap instance of each (index, slice): highdicom
    builds the first of each template group, the others are derived from it."""
    facts: dict[Path, _SourceFacts] = {}
    groups: dict[tuple[object, ...], list[tuple[int, SourceSlice]]] = {}
    for index, source in slices:
        if source.path not in facts:
            facts[source.path] = _source_facts(source.path)
        groups.setdefault(facts[source.path].group, []).append((index, source))
    for members in groups.values():
        first = facts[members[0][1].path]
        header = first.header
        if header is None:
            header = pydicom.dcmread(members[0][1].path, stop_before_pixels=True)
        rows, cols = int(header.Rows), int(header.Columns)
        template: _Template | None = None
        for start in range(0, len(members), _CHUNK):
            chunk = members[start : start + _CHUNK]
            mapped = to_source_geometry_stack(heatmaps[[i for i, _ in chunk]], rows, cols)
            for (index, source), pixels in zip(chunk, heatmap_pixels(mapped), strict=True):
                row = [float(p) for p in probabilities[index]]
                source_uid = facts[source.path].SOPInstanceUID
                explained, comments = _explained(class_names, row, model_name, model_version)
                values = _Slice(
                    uuid_uid(series_uid, source_uid, str(source.frame)),  # = _sop_uid
                    index + 1,
                    source_uid,
                    source.frame,
                    row,
                    explained,
                    comments,
                    pixels,
                )
                name = store_layout.instance_file_name(_sop_uid(series_uid, source))
                if template is None:
                    image = _highdicom_instance(
                        header,
                        source.frame,
                        pixels,
                        series_uid,
                        index + 1,
                        class_names,
                        row,
                        model_name,
                        model_version,
                        created,
                    )
                    template = _Template(image, values, header)
                    yield name, template.first
                else:
                    yield name, template.instance_bytes(values)
