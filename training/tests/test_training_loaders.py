"""Loaders for operators' datasets, on small synthetic stand-ins of each layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from inference_worker.series import select_series
from scanwatch.imaging import preprocess_slice
from scanwatch.sample import build_mr_study
from schemas.events import InstanceRef
from training.loaders import (
    DatasetError,
    load_class_folders,
    load_dicom,
    load_ham10000,
)

SIZE = 32


def write_png(path: Path, seed: int, colour: bool = False) -> None:
    rng = np.random.default_rng(seed)
    shape = (40, 50, 3) if colour else (40, 50)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def test_class_folders_split_three_ways(tmp_path: Path) -> None:
    for c, label in enumerate(("glioma", "meningioma", "notumor")):
        for i in range(10):
            write_png(tmp_path / label / f"{i}.png", c * 100 + i)
    data = load_class_folders(tmp_path, SIZE, seed=1, normal_class="notumor")
    assert data.class_names == ("normal", "glioma", "meningioma")
    assert len(data.train) + len(data.val) + len(data.test) == 30
    assert len(data.val) > 0 and len(data.test) > 0
    assert data.train.images.shape[1:] == (SIZE, SIZE, 1)
    # Images are exactly what the shared preprocessing makes of the file.
    first = data.train.groups[0].split("/", 1)[1]
    grey = np.asarray(Image.open(tmp_path / first).convert("F"), dtype=np.float32)
    np.testing.assert_array_equal(data.train.images[0], preprocess_slice(grey, SIZE)[:, :, :1])


def test_class_folders_keep_a_given_testing_folder(tmp_path: Path) -> None:
    for part, count in (("Training", 8), ("Testing", 3)):
        for label in ("glioma", "notumor"):
            for i in range(count):
                write_png(tmp_path / part / label / f"{i}.jpg", hash((part, label, i)) % 1000)
    data = load_class_folders(tmp_path, SIZE, seed=0, normal_class="notumor")
    assert len(data.test) == 6
    assert all(g.startswith("test/Testing/") for g in data.test.groups)
    assert len(data.train) + len(data.val) == 16


def test_class_folders_need_a_normal_class(tmp_path: Path) -> None:
    for label in ("glioma", "pituitary"):
        for i in range(3):
            write_png(tmp_path / label / f"{i}.png", i)
    with pytest.raises(DatasetError, match="normal_class"):
        load_class_folders(tmp_path, SIZE, seed=0)
    with pytest.raises(DatasetError, match="not one of the labels"):
        load_class_folders(tmp_path, SIZE, seed=0, normal_class="notumor")


def test_ham10000_split_by_lesion(tmp_path: Path) -> None:
    rows = []
    for lesion in range(12):
        dx = ("nv", "mel", "bkl")[lesion % 3]
        for photo in range(2):  # two photographs of each lesion
            image_id = f"ISIC_{lesion:03d}{photo}"
            write_png(
                tmp_path / "HAM10000_images_part_1" / f"{image_id}.jpg",
                lesion * 2 + photo,
                colour=True,
            )
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion:04d}",
                    "image_id": image_id,
                    "dx": dx,
                    "dx_type": "histo",
                    "age": "50",
                    "sex": "male",
                    "localization": "back",
                }
            )
    with (tmp_path / "HAM10000_metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = load_ham10000(tmp_path, SIZE, seed=3)
    assert data.class_names == ("normal", "bkl", "mel")
    assert data.train.images.shape[1:] == (SIZE, SIZE, 3)
    splits = [set(getattr(data, s).groups) for s in ("train", "val", "test")]
    assert sum(len(s) for s in splits) == 12
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    for name in ("train", "val", "test"):  # both photographs of a lesion in the same split
        groups = getattr(data, name).groups
        assert all((groups == g).sum() == 2 for g in set(groups))


def test_ham10000_missing_images_are_named(tmp_path: Path) -> None:
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\n")
    with pytest.raises(DatasetError, match="ISIC_1"):
        load_ham10000(tmp_path, SIZE, seed=0)


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("dicom")
    rows = []
    for number in range(4):
        patient = f"TRAIN-{number}"
        paths = build_mr_study(root / patient, patient_id=patient, n_slices=3, seed=number)
        series = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        rows.append(
            {
                "SeriesInstanceUID": series,
                "label": "normal" if number % 2 else "mass",
                "paths": paths,
            }
        )
    return root, rows


def test_dicom_series_with_labels_csv(tmp_path: Path, dicom_studies) -> None:
    root, rows = dicom_studies
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "SeriesInstanceUID,label\n"
        + "".join(f"{r['SeriesInstanceUID']},{r['label']}\n" for r in rows)
    )
    data = load_dicom(root, labels, SIZE, seed=0)
    assert data.class_names == ("normal", "mass")
    assert len(data.train) + len(data.val) + len(data.test) == 12  # 4 series x 3 slices
    groups = [set(getattr(data, s).groups) for s in ("train", "val", "test")]
    assert all(g <= {f"TRAIN-{n}" for n in range(4)} for g in groups)
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_training_and_worker_make_the_same_tensor(tmp_path: Path, dicom_studies) -> None:
    """The DICOM loader and the inference worker preprocess a slice identically."""
    _, rows = dicom_studies
    path = rows[0]["paths"][1]
    ds = pydicom.dcmread(path)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"SOPInstanceUID,label\n{ds.SOPInstanceUID},mass\n"
        f"{pydicom.dcmread(rows[1]['paths'][0]).SOPInstanceUID},normal\n"
        f"{pydicom.dcmread(rows[2]['paths'][0]).SOPInstanceUID},normal\n"
    )
    data = load_dicom(
        path.parent.parent,
        labels,
        SIZE,
        seed=0,
    )
    every = {
        g: img
        for s in ("train", "val", "test")
        for g, img in zip(getattr(data, s).groups, getattr(data, s).images, strict=True)
    }
    trained_on = every["TRAIN-0"]
    ref = InstanceRef(
        SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID=ds.SOPInstanceUID,
        SOPClassUID=ds.SOPClassUID,
        storage_uri=path.resolve().as_uri(),
        sha256="0" * 64,
    )
    served = select_series([ref], image_size=SIZE).images[0]
    np.testing.assert_array_equal(np.repeat(trained_on, 3, axis=-1), served)


def test_dicom_labels_csv_needs_a_key_column(tmp_path: Path, dicom_studies) -> None:
    root, _ = dicom_studies
    labels = tmp_path / "labels.csv"
    labels.write_text("PatientName,label\nx,normal\n")
    with pytest.raises(DatasetError, match="SOPInstanceUID"):
        load_dicom(root, labels, SIZE, seed=0)
