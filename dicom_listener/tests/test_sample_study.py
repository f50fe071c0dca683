"""The MNI152-based sample MR series that demos and tests send."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from scanwatch.sample import BASE_ACQUISITION, STUDY_INTERVAL, build_mr_study


def test_series_is_a_consistent_axial_mr_series(mr_series: list[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in mr_series]
    assert len(datasets) == 6
    for number, ds in enumerate(datasets, start=1):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        assert ds.InstanceNumber == number
        assert (ds.Rows, ds.Columns) == (233, 197) == ds.pixel_array.shape
        assert ds.BitsStored == 12 and ds.pixel_array.max() <= 4095
        assert ds.PatientID == "SW-TEST-LISTENER" and ds.SeriesDescription == "T1 AX"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and len(set(z)) == 6
    # Every slice holds brain, not an empty cap of the volume.
    assert all((ds.pixel_array > 1000).mean() > 0.05 for ds in datasets)


def test_same_inputs_give_same_files_and_seed_gives_a_later_study(tmp_path: Path) -> None:
    a = build_mr_study(tmp_path / "a", patient_id="P1", n_slices=2)
    b = build_mr_study(tmp_path / "b", patient_id="P1", n_slices=2)
    c = build_mr_study(tmp_path / "c", patient_id="P1", n_slices=2, seed=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    first, later = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert first.StudyInstanceUID != later.StudyInstanceUID
    assert first.StudyDate == BASE_ACQUISITION.strftime("%Y%m%d")
    assert later.StudyDate == (BASE_ACQUISITION + STUDY_INTERVAL).strftime("%Y%m%d")
    given = build_mr_study(tmp_path / "d", patient_id="P1", n_slices=1, study_uid="1.2.3.4")
    assert pydicom.dcmread(given[0]).StudyInstanceUID == "1.2.3.4"
