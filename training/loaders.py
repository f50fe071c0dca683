"""Loaders for the dataset layouts operators bring, into :class:`training.dataset.LabelledImages`.

- :func:`load_class_folders`: one folder per class (the Kaggle brain-tumour MRI layout:
  ``glioma/ meningioma/ pituitary/ notumor/``), optionally under ``Training/`` and ``Testing/``.
- :func:`load_ham10000`: HAM10000-style skin lesions: ``<image_id>.jpg`` files anywhere under the
  root and a metadata CSV with ``lesion_id``, ``image_id`` and ``dx``; split by ``lesion_id`` so
  that photographs of one lesion never straddle two splits.
- :func:`load_dicom`: DICOM files anywhere under the root and a labels CSV keyed by
  ``SOPInstanceUID``, ``SeriesInstanceUID`` or ``StudyInstanceUID``; split by ``PatientID``.

Greyscale images (MR slices, DICOM or image files) go through
:func:`scanwatch.imaging.preprocess_slice`, the very function the inference worker applies to a
received slice. Colour photographs are padded to a square and resized the same way, per channel.

The serving contract needs a class called ``normal`` (the anomaly score is ``1 - p(normal)``):
``normal_class`` names the dataset's label that means it (``notumor``, ``nv``...), which is
renamed ``normal``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from scanwatch.imaging import preprocess_slice, square_resize
from schemas.model_signature import NORMAL_CLASS
from training.dataset import (
    TEST_FRACTION,
    VAL_FRACTION,
    LabelledImages,
    Split,
    from_arrays,
    split_by_group,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
TRAINING_FOLDERS = {"training", "train"}
TESTING_FOLDERS = {"testing", "test"}
HAM_METADATA = "HAM10000_metadata.csv"
HAM_NORMAL = "nv"
DICOM_KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
LABEL_COLUMN = "label"


class DatasetError(ValueError):
    """The data does not have the expected layout; the message says what is wrong."""


def class_order(labels: Iterable[str], normal_class: str | None) -> tuple[list[str], dict]:
    """Class names (``normal`` first, the rest sorted) and the label → name renaming."""
    distinct = sorted(set(labels))
    rename = {label: label for label in distinct}
    if normal_class is not None:
        if normal_class not in rename:
            raise DatasetError(f"normal_class {normal_class!r} is not one of the labels {distinct}")
        rename[normal_class] = NORMAL_CLASS
    names = sorted(set(rename.values()))
    if NORMAL_CLASS not in names:
        raise DatasetError(
            f"no class means 'normal' among {distinct}: pass normal_class (e.g. 'notumor')"
        )
    if len(names) < 2:
        raise DatasetError(f"need at least two classes, got {names}")
    names.remove(NORMAL_CLASS)
    return [NORMAL_CLASS, *names], rename


def read_image(path: Path, size: int, colour: bool) -> np.ndarray:
    """An image file as a model input ``(size, size, 1 | 3)`` float32 in [0, 255]."""
    from PIL import Image

    with Image.open(path) as image:
        if colour:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
            return np.stack([square_resize(rgb[:, :, c], size) for c in range(3)], axis=-1)
        grey = np.asarray(image.convert("F"), dtype=np.float32)
    return preprocess_slice(grey, size)[:, :, :1]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = {p.name: _images_in(p) for p in sorted(root.iterdir()) if p.is_dir()}
    return {name: files for name, files in folders.items() if files}


def load_class_folders(
    root: Path,
    image_size: int,
    seed: int,
    normal_class: str | None = None,
    colour: bool = False,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> LabelledImages:
    """One folder per class. With ``Training/`` and ``Testing/`` sub-folders, ``Testing`` is the
    test split and validation comes out of ``Training``; otherwise all three are drawn.

    Each image is its own group (such layouts carry no patient identity): when a patient has
    several images, prefer a layout with patient ids (DICOM) or accept optimistic figures.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    subfolders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    training = next((subfolders[n] for n in TRAINING_FOLDERS if n in subfolders), None)
    testing = next((subfolders[n] for n in TESTING_FOLDERS if n in subfolders), None)
    parts = (
        {"train": _class_folders(training), "test": _class_folders(testing)}
        if training is not None and testing is not None
        else {"all": _class_folders(root)}
    )
    labels_seen = [label for part in parts.values() for label in part]
    if not labels_seen:
        raise DatasetError(f"{root} has no class folders with images ({sorted(IMAGE_SUFFIXES)})")
    class_names, rename = class_order(labels_seen, normal_class)
    loaded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for part, by_class in parts.items():
        part_images: list[np.ndarray] = []
        part_labels: list[int] = []
        part_groups: list[str] = []
        for label, files in by_class.items():
            for path in files:
                part_images.append(read_image(path, image_size, colour))
                part_labels.append(class_names.index(rename[label]))
                part_groups.append(f"{part}/{path.relative_to(root).as_posix()}")
        loaded[part] = (np.stack(part_images), np.asarray(part_labels), np.asarray(part_groups))
    description = {"source": "class-folders", "root": str(root), "normal_class": normal_class}
    if "all" in loaded:
        images, labels, groups = loaded["all"]
        return from_arrays(
            images, labels, groups, class_names, seed, description, val_fraction, test_fraction
        )
    images, labels, groups = loaded["train"]
    indices = split_by_group(groups, seed, val_fraction / (1 - test_fraction), 0.0)
    test_images, test_labels, test_groups = loaded["test"]
    return LabelledImages(
        tuple(class_names),
        train=Split(images[indices["train"]], labels[indices["train"]], groups[indices["train"]]),
        val=Split(images[indices["val"]], labels[indices["val"]], groups[indices["val"]]),
        test=Split(test_images, test_labels, test_groups),
        description=description,
    )


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in required if not rows or c not in rows[0]]
    if missing:
        raise DatasetError(f"{path} lacks the column(s) {', '.join(missing)}")
    return rows


def load_ham10000(
    root: Path,
    image_size: int,
    seed: int,
    metadata: Path | None = None,
    normal_class: str = HAM_NORMAL,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> LabelledImages:
    """HAM10000 layout: metadata CSV (``lesion_id``, ``image_id``, ``dx``) + ``<image_id>.jpg``.

    ``dx`` is the class; ``normal_class`` (default ``nv``, melanocytic nevi) becomes ``normal``.
    """
    root = Path(root)
    rows = _read_csv(metadata or root / HAM_METADATA, ("lesion_id", "image_id", "dx"))
    files = {p.stem: p for p in _images_in(root)}
    missing = [r["image_id"] for r in rows if r["image_id"] not in files]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) of the metadata are not under {root}, e.g. {missing[:3]}"
        )
    class_names, rename = class_order((r["dx"] for r in rows), normal_class)
    images = np.stack([read_image(files[r["image_id"]], image_size, colour=True) for r in rows])
    labels = np.asarray([class_names.index(rename[r["dx"]]) for r in rows])
    groups = [r["lesion_id"] for r in rows]
    description = {"source": "ham10000", "root": str(root), "normal_class": normal_class}
    return from_arrays(
        images, labels, groups, class_names, seed, description, val_fraction, test_fraction
    )


def load_dicom(
    root: Path,
    labels_csv: Path,
    image_size: int,
    seed: int,
    normal_class: str | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> LabelledImages:
    """DICOM files under ``root`` labelled by a CSV with ``label`` and one of
    ``SOPInstanceUID`` / ``SeriesInstanceUID`` / ``StudyInstanceUID`` (the most specific
    present wins). Every frame of a labelled instance becomes an image with that label; images
    are split by ``PatientID`` (``StudyInstanceUID`` when absent). Unlabelled files are skipped.
    """
    import pydicom

    rows = _read_csv(Path(labels_csv), (LABEL_COLUMN,))
    key = next((k for k in DICOM_KEYS if k in rows[0]), None)
    if key is None:
        raise DatasetError(f"{labels_csv} needs one of the columns {', '.join(DICOM_KEYS)}")
    wanted = {r[key].strip(): r[LABEL_COLUMN].strip() for r in rows}
    class_names, rename = class_order(wanted.values(), normal_class)
    images, labels, groups = [], [], []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM: skipped, as a PACS export has extras
            continue
        label = wanted.get(str(getattr(ds, key, "")))
        if label is None:
            continue
        pixels = ds.pixel_array
        frames = pixels if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else pixels[None]
        if frames.ndim != 3:
            raise DatasetError(f"{path.name} is not greyscale 2-D: {pixels.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        group = str(getattr(ds, "PatientID", "") or ds.StudyInstanceUID)
        for frame in frames:
            images.append(preprocess_slice(frame, image_size, slope, intercept)[:, :, :1])
            labels.append(class_names.index(rename[label]))
            groups.append(group)
    if not images:
        raise DatasetError(f"no DICOM image under {root} matches a row of {labels_csv}")
    description = {"source": "dicom", "root": str(root), "key": key, "normal_class": normal_class}
    return from_arrays(
        np.stack(images),
        np.asarray(labels),
        groups,
        class_names,
        seed,
        description,
        val_fraction,
        test_fraction,
    )
