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
written durably (:func:`scanwatch.durable.write_bytes_atomic`: temporary file, fsync, rename,
fsync the folder) under the store's layout (:mod:`scanwatch.store_layout`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import highdicom
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from scipy import ndimage

from inference_worker.fhir_resources import HeatmapSeriesRef
from inference_worker.series import SourceSlice
from scanwatch import store_layout
from scanwatch.durable import fsync_dir, write_bytes_atomic

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


def to_source_geometry(heatmap: npt.NDArray[np.float32], rows: int, cols: int) -> npt.NDArray:
    """Undo :func:`scanwatch.imaging.square_resize` for a heatmap: resize the model's S×S map
    to the zero-padded square of the source slice, then crop the padding."""
    side = max(rows, cols)
    size = heatmap.shape[0]
    square = heatmap if side == size else ndimage.zoom(heatmap, side / size, order=1)
    padded = np.zeros((side, side), dtype=np.float32)
    r, c = min(side, square.shape[0]), min(side, square.shape[1])
    padded[:r, :c] = square[:r, :c]
    top, left = (side - rows) // 2, (side - cols) // 2
    return padded[top : top + rows, left : left + cols]


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
    explained = class_names[int(np.argmax(probabilities))]
    block.add_new(CLASS_NAMES_ELEMENT, "LO", list(class_names))
    block.add_new(PROBABILITIES_ELEMENT, "FD", [float(p) for p in probabilities])
    block.add_new(EXPLAINED_CLASS_ELEMENT, "LO", explained)
    block.add_new(MODEL_NAME_ELEMENT, "LO", model_name)
    block.add_new(MODEL_VERSION_ELEMENT, "IS", str(model_version))
    words = ", ".join(f"{n} {p:.3f}" for n, p in zip(class_names, probabilities, strict=True))
    ds.ImageComments = (
        f"AI Grad-CAM of '{explained}' (not reviewed), {model_name} v{model_version}; "
        f"slice probabilities: {words}"
    )[:10240]


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
    """One Secondary Capture heatmap of one source slice (``source`` read with its header).

    Every date and time in it is ``created`` (the ready event's time, like the FHIR result's
    ``issued``), so the same study builds the same bytes."""
    rows, cols = int(source.Rows), int(source.Columns)
    mapped = to_source_geometry(np.asarray(heatmap, dtype=np.float32), rows, cols)
    pixels = np.clip(np.rint(mapped * 255.0), 0, 255).astype(np.uint8)
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
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        reference.ReferencedFrameNumber = frame + 1
    image.SourceImageSequence = DicomSequence([reference])
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
    written = 0
    headers: dict[Path, Dataset] = {}
    for number, (source, heatmap, row) in enumerate(
        zip(sources, heatmaps, probabilities, strict=True), start=1
    ):
        sop_uid = _sop_uid(series_uid, source)
        sop_uids.append(sop_uid)
        path = folder / store_layout.instance_file_name(sop_uid)
        if path.exists():
            continue
        if source.path not in headers:
            headers[source.path] = pydicom.dcmread(source.path, stop_before_pixels=True)
        image = build_instance(
            headers[source.path],
            source.frame,
            heatmap,
            series_uid,
            number,
            class_names,
            [float(p) for p in row],
            model_name,
            model_version,
            created,
        )
        buffer = BytesIO()
        image.save_as(buffer, enforce_file_format=True)
        write_bytes_atomic(path, buffer.getvalue())
        written += 1
    return HeatmapSeries(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        SOPInstanceUIDs=tuple(sop_uids),
        SOPClassUID=SECONDARY_CAPTURE,
        written=written,
    )
