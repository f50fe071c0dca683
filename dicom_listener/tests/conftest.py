"""Fixtures for the listener's tests: a small real MR series and a Part 10 splitter."""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from scanwatch.sample import build_mr_study

#: (0002,0000) File Meta Information Group Length, explicit VR little endian, UL.
_GROUP_LENGTH_HEADER = b"\x02\x00\x00\x00UL\x04\x00"


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a Part 10 file, split where the file meta ends."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    assert data[132:140] == _GROUP_LENGTH_HEADER, "file meta does not start with group length"
    (group_length,) = struct.unpack("<I", data[140:144])
    end = 144 + group_length
    return data[:end], data[end:]


@pytest.fixture(scope="session")
def mr_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six slices of the MNI152 sample series (explicit VR little endian Part 10 files)."""
    return build_mr_study(tmp_path_factory.mktemp("mr"), patient_id="SW-TEST-LISTENER", n_slices=6)


@pytest.fixture(scope="session")
def dataset_bytes() -> Callable[[bytes], bytes]:
    """The dataset part of a Part 10 file's bytes (what travels in a C-STORE)."""
    return lambda data: split_part10(data)[1]


@pytest.fixture
def encode(dataset_bytes: Callable[[bytes], bytes]) -> Callable[[pydicom.Dataset], bytes]:
    """A dataset as it travels in a C-STORE: explicit VR little endian, no file meta."""

    def _encode(ds: pydicom.Dataset) -> bytes:
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
        return dataset_bytes(out.getvalue())

    return _encode


@pytest.fixture
def instance(mr_series: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(mr_series[0])


@pytest.fixture
def wire(mr_series: list[Path], dataset_bytes: Callable[[bytes], bytes]) -> bytes:
    return dataset_bytes(mr_series[0].read_bytes())
