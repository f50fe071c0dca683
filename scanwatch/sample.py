"""A real-looking MR study built from nilearn's bundled MNI152 T1 template.

The template is a real 1 mm brain MRI (197 × 233 × 189 voxels, RAS+ orientation). This module
cuts ``n_slices`` axial slices from it, spread evenly over the brain, and writes them as an MR
Image Storage series (PS3.3 A.4) in the DICOM File Format (PS3.10), explicit VR little endian,
so that the listener, the worker and the demos have real anatomy to work on without any
download. Patient demographics are synthetic.

Everything is deterministic: the same ``patient_id``, ``seed`` and ``study_uid`` give the same
UIDs, pixels and dates, so a re-sent sample is a duplicate send, not a new study.
"""

from __future__ import annotations

import hashlib
import importlib.util
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: Stored pixel range: 12 bits in 16-bit unsigned words, as most MR scanners write.
BITS_STORED = 12
MAX_STORED_VALUE = (1 << BITS_STORED) - 1
#: A slice belongs to the brain when its foreground covers at least this share of the largest
#: slice's foreground; it skips the near-empty caps at the top and bottom of the volume.
MIN_FOREGROUND_SHARE = 0.15
#: Voxels above this share of the volume maximum count as foreground.
FOREGROUND_LEVEL = 0.05
#: Relative standard deviation of the Rician-like noise that makes each seed's study distinct.
NOISE_LEVEL = 0.01
#: First acquisition of seed 0; seed ``n`` is ``n`` × :data:`STUDY_INTERVAL` later, so that a
#: patient's studies made with seeds 0, 1, 2 … form a time series (for trend demos).
BASE_ACQUISITION = datetime(2025, 1, 6, 9, 30, 0)
STUDY_INTERVAL = timedelta(days=28)

#: The 1 mm T1 template nilearn ships in ``nilearn/datasets/data``.
MNI152_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

_GIVEN_NAMES = ("Patient", "Alex", "Robin", "Sam", "Kim", "Jordan", "Charlie", "Morgan")
_SEXES = ("F", "M")


def _digest(*parts: object) -> int:
    """A stable integer from ``parts`` (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def mni152_volume() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template (1 mm) as float32 voxels in [0, 1] and its RAS+ affine.

    Same data as ``nilearn.datasets.load_mni152_template(resolution=1)`` (the file nilearn bundles,
    scaled by its maximum), read with nibabel directly: importing ``nilearn.datasets`` costs
    seconds (scikit-learn, pandas) that every test and ``send-sample`` would pay.
    """
    import nibabel

    spec = importlib.util.find_spec("nilearn")
    bundled = (
        Path(spec.origin).parent / "datasets" / "data" / MNI152_T1_FILE
        if spec is not None and spec.origin
        else None
    )
    if bundled is not None and bundled.is_file():
        # nibabel.load is typed as returning any image; a .nii.gz is a Nifti1Image.
        image = cast("nibabel.Nifti1Image", nibabel.load(bundled))
        volume = np.asarray(image.dataobj, dtype=np.float32)
    else:  # a nilearn that moved its data: take the slow, official way
        from nilearn.datasets import load_mni152_template

        image = load_mni152_template(resolution=1)
        volume = np.asarray(image.get_fdata(), dtype=np.float32)
    peak = float(volume.max()) or 1.0
    return volume / peak, np.asarray(image.affine, dtype=np.float64)


def brain_slice_indices(volume: np.ndarray, n_slices: int) -> list[int]:
    """``n_slices`` axial (third-axis) indices spread evenly over the slices that hold brain."""
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    area = (volume > FOREGROUND_LEVEL).sum(axis=(0, 1))
    brain = np.flatnonzero(area >= MIN_FOREGROUND_SHARE * area.max())
    first, last = int(brain[0]), int(brain[-1])
    if n_slices > last - first + 1:
        raise ValueError(f"n_slices must be at most {last - first + 1}, got {n_slices}")
    return [int(round(k)) for k in np.linspace(first, last, n_slices)]


def _to_dicom_pixels(axial: np.ndarray) -> np.ndarray:
    """An RAS voxel slice ``[i, j]`` → DICOM pixel rows/columns for orientation (1,0,0,0,1,0).

    DICOM's patient coordinates are LPS: columns run from the patient's right to left (+x) and
    rows from anterior to posterior (+y), so both RAS axes are reversed and transposed.
    """
    return axial[::-1, ::-1].T


def build_mr_study(
    out_dir: Path,
    *,
    patient_id: str = "SW-DEMO-0001",
    n_slices: int = 38,
    study_uid: str | None = None,
    seed: int = 0,
    acquired_at: datetime | None = None,
) -> list[Path]:
    """Write one axial T1 MR series of ``n_slices`` slices into ``out_dir``; return the paths.

    ``study_uid`` defaults to a UID derived from ``patient_id`` and ``seed``; ``acquired_at``
    defaults to :data:`BASE_ACQUISITION` + ``seed`` × :data:`STUDY_INTERVAL`. Files are named
    ``MR0001.dcm`` … in InstanceNumber order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume, affine = mni152_volume()
    indices = brain_slice_indices(volume, n_slices)
    rng = np.random.default_rng(_digest(patient_id, seed))

    key = _digest(patient_id)
    study_uid = study_uid or _uid("study", patient_id, seed)
    series_uid = _uid("series", study_uid)
    frame_uid = _uid("frame", study_uid)
    when = acquired_at or BASE_ACQUISITION + seed * STUDY_INTERVAL
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    n_i, n_j, _ = volume.shape
    # LPS position of pixel (row 0, column 0): RAS voxel (n_i - 1, n_j - 1, k), x and y negated.
    corner = affine @ np.array([n_i - 1, n_j - 1, 0, 1])
    spacing = [float(abs(affine[1, 1])), float(abs(affine[0, 0]))]  # row, column spacing
    thickness = float(abs(affine[2, 2]))
    gap = (indices[-1] - indices[0]) / max(n_slices - 1, 1) * thickness

    paths: list[Path] = []
    for number, k in enumerate(indices, start=1):
        axial = volume[:, :, k]
        noisy = np.hypot(
            axial + rng.normal(0.0, NOISE_LEVEL, axial.shape),
            rng.normal(0.0, NOISE_LEVEL, axial.shape),
        )
        stored = np.clip(np.rint(noisy * MAX_STORED_VALUE), 0, MAX_STORED_VALUE)
        pixels = np.ascontiguousarray(_to_dicom_pixels(stored).astype(np.uint16))
        z = float((affine @ np.array([0, 0, k, 1]))[2])
        sop_uid = _uid("instance", series_uid, number)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
        ds.AccessionNumber = f"SW{_digest('accession', study_uid) % 10**10:010d}"
        ds.Modality = "MR"
        ds.Manufacturer = "scanwatch"
        ds.ManufacturerModelName = "MNI152 sample"
        ds.InstitutionName = "Scanwatch Demo Hospital"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MRI BRAIN"
        ds.SeriesDescription = "T1 AX"
        ds.PatientName = f"Demo^{_GIVEN_NAMES[key % len(_GIVEN_NAMES)]}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = f"{1950 + key % 50}0{1 + key % 9}1{key % 10}"
        ds.PatientSex = _SEXES[(key >> 8) % len(_SEXES)]
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = f"{thickness:g}"
        ds.SpacingBetweenSlices = f"{gap:.4g}"
        ds.RepetitionTime = "2300"
        ds.EchoTime = "2.98"
        ds.InversionTime = "900"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "3"
        ds.FlipAngle = "9"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{-corner[0]:g}", f"{-corner[1]:g}", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = BITS_STORED
        ds.HighBit = BITS_STORED - 1
        ds.PixelRepresentation = 0
        ds.WindowCenter = str(MAX_STORED_VALUE // 2)
        ds.WindowWidth = str(MAX_STORED_VALUE)
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PixelData = pixels.tobytes()

        path = out_dir / f"MR{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True, little_endian=True, implicit_vr=False)
        paths.append(path)
    return paths
