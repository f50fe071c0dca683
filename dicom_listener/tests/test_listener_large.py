"""A 500 MB multi-frame instance streams to disk: the listener process's peak memory stays a
fraction of the instance, and the stored file is byte-exact."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from devtools.kafka_local import free_port
from devtools.peers import echoscu, storescu
from devtools.testing import wait_for
from dicom_listener.tests.conftest import split_part10

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FRAMES, ROWS, COLUMNS = 500, 1024, 1024  # 8-bit: 524 MB of pixel data
#: Peak resident memory the listener may reach while receiving it (its baseline is ~100 MB).
MAX_PEAK_BYTES = 250 * 2**20


def write_multiframe(path: Path) -> None:
    """An Enhanced MR instance of FRAMES 8-bit frames, written without holding it in memory."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.PatientID = "SW-TEST-LARGE"
    ds.NumberOfFrames = FRAMES
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (ROWS * COLUMNS // 256)
    with open(path, "ab") as fp:
        # (7FE0,0010) OB, explicit VR little endian, then the frames.
        fp.write(b"\xe0\x7f\x10\x00OB\x00\x00" + (FRAMES * len(frame)).to_bytes(4, "little"))
        for _ in range(FRAMES):
            fp.write(frame)


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def meta_size(path: Path) -> int:
    """Bytes of preamble and File Meta at the start of a Part 10 file."""
    with open(path, "rb") as fp:
        return len(split_part10(fp.read(4096))[0])


def sha256(path: Path, skip: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        fp.seek(skip)
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_500_mb_multiframe_streams_to_disk(tmp_path: Path) -> None:
    source = tmp_path / "large.dcm"
    write_multiframe(source)
    assert source.stat().st_size > 500 * 10**6
    port = free_port()
    env = {
        **os.environ,
        "SCANWATCH_LISTENER_PORT": str(port),
        "SCANWATCH_LISTENER_STORAGE_DIR": str(tmp_path / "store"),
        "SCANWATCH_LISTENER_METRICS_PORT": "0",
        "SCANWATCH_LISTENER_PUBLISHER_PROCESS": "false",  # one process to measure
        "SCANWATCH_LISTENER_MIN_FREE_DISK_BYTES": "0",
        "SCANWATCH_LISTENER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # events wait
    }
    proc = subprocess.Popen([sys.executable, "-m", "dicom_listener"], cwd=ROOT, env=env)
    try:
        wait_for(lambda: echoscu("127.0.0.1", port, "SCANWATCH", timeout=1), 30, "listener up")
        storescu([source], "127.0.0.1", port, "SCANWATCH")
        peak = peak_rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    [stored] = (tmp_path / "store").glob("*/*/*.dcm")
    assert sha256(stored, meta_size(stored)) == sha256(source, meta_size(source)), "not exact"
    assert pydicom.dcmread(stored, stop_before_pixels=True).NumberOfFrames == FRAMES
    assert peak < MAX_PEAK_BYTES, f"peak RSS {peak / 2**20:.0f} MiB while receiving 524 MB"
