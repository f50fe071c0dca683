"""Issue 20, point 4: the header of an instance scanners send is read by a scan that builds no
pydicom ``Dataset``; what it reads must be what pydicom reads, and anything it is not sure of
goes to pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from inference_worker import series
from inference_worker.header import read_selection_header
from inference_worker.pixels import NativePixels, decode_and_resize, native_pixels
from inference_worker.tests.test_worker_scoring import enhanced_mr, refs_for
from scanwatch.imaging import preprocess_grey
from scanwatch.sample import build_mr_study

_ABSENT = object()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return build_mr_study(tmp_path_factory.mktemp("scan"), n_slices=4)


def variant(
    study: list[Path], tmp_path: Path, implicit: bool = False, **attributes: object
) -> Path:
    """The study's second instance with ``attributes`` set (``_ABSENT``: removed)."""
    ds = pydicom.dcmread(study[1])
    for keyword, value in attributes.items():
        if value is _ABSENT:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / "variant.dcm"
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def read(path: Path) -> tuple[series.InstanceHeader, series.PixelSource]:
    (ref,) = refs_for([path])
    (instance,) = series.read_instances([ref])
    return instance


SCANNED = {
    "the sample": {},
    "implicit VR": {"implicit": True},
    "description padded": {"SeriesDescription": "T1 AX "},
    "Latin-1 description": {"SpecificCharacterSet": "ISO_IR 100", "SeriesDescription": "Schädel"},
    "UTF-8 description": {"SpecificCharacterSet": "ISO_IR 192", "SeriesDescription": "頭部 T1"},
    "no description": {"SeriesDescription": _ABSENT},
    "no orientation": {"ImageOrientationPatient": _ABSENT},
    "no position": {"ImagePositionPatient": _ABSENT},
    "no thickness": {"SliceThickness": _ABSENT},
    "no instance number": {"InstanceNumber": _ABSENT},
    "rescaled": {"RescaleSlope": "0.5", "RescaleIntercept": "-10"},
    "slope zero": {"RescaleSlope": "0"},
    "sagittal": {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]},
    "not MR": {"Modality": "CT"},
    "no samples per pixel": {"SamplesPerPixel": _ABSENT},
    "one frame said": {"NumberOfFrames": 1},
}


@pytest.mark.parametrize("attributes", SCANNED.values(), ids=SCANNED.keys())
def test_the_scan_reads_what_pydicom_reads(study, tmp_path, attributes):
    path = variant(study, tmp_path, **attributes)
    header, source = read(path)
    ds = pydicom.dcmread(path, defer_size=series._DEFER_BYTES)
    assert isinstance(source, NativePixels)  # scanned: no Dataset built
    assert header == read_selection_header(ds)
    assert source == native_pixels(ds)


PYDICOM = {
    "Cyrillic": {"SpecificCharacterSet": "ISO_IR 144", "SeriesDescription": "Голова"},
    "two descriptions": {"SeriesDescription": ["T1", "AX"]},
    "two frames said": {"NumberOfFrames": 2},
    "no rows": {"Rows": _ABSENT},
}


@pytest.mark.parametrize("attributes", PYDICOM.values(), ids=PYDICOM.keys())
def test_what_the_scan_is_not_sure_of_is_read_by_pydicom(study, tmp_path, attributes):
    path = variant(study, tmp_path, **attributes)
    header, source = read(path)
    assert isinstance(source, pydicom.Dataset)
    assert header == read_selection_header(source)


def test_compressed_and_enhanced_instances_are_read_by_pydicom(study, tmp_path):
    for path in (Path(get_testdata_file("MR_small_RLE.dcm")), enhanced_mr(study, tmp_path / "e")):
        header, source = read(path)
        assert isinstance(source, pydicom.Dataset), path.name
        assert header == read_selection_header(pydicom.dcmread(path))


def test_scanned_pixels_decode_as_pydicom_decodes_them(study, tmp_path):
    path = variant(study, tmp_path, RescaleSlope="2", RescaleIntercept="-3")
    refs = refs_for([path])
    chosen = series.choose_series(refs)
    (work,) = series.pixel_work(chosen)
    assert work.native is not None and work.dataset is None
    decoded = decode_and_resize([work], 32)
    expected = preprocess_grey(pydicom.dcmread(path).pixel_array, 32, 2.0, -3.0)
    np.testing.assert_array_equal(decoded.images[0], expected)


def test_an_unreadable_file_is_still_an_unusable_study(study, tmp_path):
    path = tmp_path / "cut.dcm"
    path.write_bytes(b"not a DICOM file")
    (ref,) = refs_for([study[0]])
    ref = ref.model_copy(update={"storage_uri": path.resolve().as_uri()})
    with pytest.raises(series.UnusableStudy, match="cannot read instance"):
        series.read_instances([ref])
