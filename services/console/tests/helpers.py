"""Filling a file store exactly as the listener does (its own FileStore), tokens, and the
stack the console runs in under ``scanwatch run``."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from devtools.kafka_local import free_port
from devtools.stack import Ports, Stack, StackConfig
from dicom_listener.adapters.filestore import FileStore


def put(store: FileStore, source: Path, version: int = 1) -> Path:
    """Store the Part 10 file ``source`` as the listener does (temp file under .incoming,
    adopt, commit); return the stored path."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    store.incoming.mkdir(parents=True, exist_ok=True)
    tmp = store.incoming / f"{os.getpid()}-{ds.SOPInstanceUID}-{version}.tmp"
    shutil.copyfile(source, tmp)
    data = tmp.read_bytes()
    staged = store.adopt(
        tmp,
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        hashlib.sha256(data).hexdigest(),
        len(data),
    )
    return store.commit(staged, version).path


def relabelled(
    source: Path, out: Path, transfer_syntax: str | None = None, **values: object
) -> Path:
    """A copy of ``source`` with new Study/Series/SOP UIDs (or those given) and other
    attributes set: pydicom's test files share their UIDs. ``transfer_syntax`` relabels the
    file meta only (the pixel data stay as they are)."""
    ds = pydicom.dcmread(source)
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    values = {
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "SOPInstanceUID": generate_uid(),
    } | values
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@contextmanager
def console_stack(var: Path) -> Iterator[Stack]:
    """The FHIR API and the console as ``scanwatch run`` starts them, on free ports, with
    tokens required (the console then runs beside the portal); stopped afterwards."""
    config = StackConfig(
        var=var,
        ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
        chatbot=True,
        only=("fhir-api", "console"),
    )
    running = Stack(config)
    try:
        running.start(timeout=180)
        yield running
    finally:
        running.stop()
