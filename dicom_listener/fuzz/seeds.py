"""Each fuzz target's starting corpus, from real encodings: PDUs and DIMSE messages as
pynetdicom encodes them, datasets from pydicom's own test files.

An input of the ``association`` target is what a peer sends on one connection; ``pdata``
inputs follow :func:`associate_rq` (what comes after negotiation); ``scan`` inputs are Part 10
files whose first preamble byte says how the scan reads them (odd: implicit VR); ``store``
inputs are one selector byte (odd: implicit VR) and a dataset; ``file_meta`` inputs are three
NUL-separated values; ``command`` inputs are Command Sets.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from copy import deepcopy
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from dicom_listener.dicom.uids import VERIFICATION

#: The called AE title the targets' association answers to.
AE_TITLE = "SCANWATCH"
#: Presentation contexts of :func:`associate_rq`: Verification, MR (explicit, implicit), CT.
ECHO_CONTEXT, MR_CONTEXT, CT_CONTEXT = 1, 3, 5
#: Small real files from pydicom's test set (the fuzzer's inputs stay a few kilobytes).
_MAX_SEED_FILE = 20_000
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _associate(called: str = AE_TITLE, max_pdu: int = 16_384, extra: bool = False) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FUZZ"
    primitive.called_ae_title = called
    contexts = [
        build_context(VERIFICATION, [ImplicitVRLittleEndian]),
        build_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        build_context(CTImageStorage),
    ]
    for context, context_id in zip(contexts, (ECHO_CONTEXT, MR_CONTEXT, CT_CONTEXT), strict=True):
        context.context_id = context_id
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    user: list[Any] = [max_length]
    if extra:  # the other user-information items a real SCU sends
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.2.0.2")
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = "PYNETDICOM_202"
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = MRImageStorage
        role.scu_role, role.scp_role = True, False
        user += [implementation, version, window, role]
    primitive.user_information = user
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@cache
def associate_rq() -> bytes:
    """A pynetdicom A-ASSOCIATE-RQ to ``SCANWATCH`` proposing :data:`ECHO_CONTEXT`,
    :data:`MR_CONTEXT` and :data:`CT_CONTEXT` (what every ``pdata`` input follows)."""
    return _associate()


def _pdus(message: DIMSEMessage, context_id: int, max_pdu: int) -> bytes:
    out = bytearray()
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return bytes(out)


def echo(message_id: int = 1, max_pdu: int = 16_384) -> bytes:
    """P-DATA-TF PDUs of a C-ECHO-RQ on the Verification context."""
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return _pdus(message, ECHO_CONTEXT, max_pdu)


def dataset_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    """``ds`` encoded as it travels in a C-STORE (no file meta), little endian."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return bytes(out.getvalue())


def store(dataset: bytes, sop_instance: str, message_id: int = 2, max_pdu: int = 16_384) -> bytes:
    """P-DATA-TF PDUs of a C-STORE-RQ of ``dataset`` on the MR context."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = MRImageStorage
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return _pdus(message, MR_CONTEXT, max_pdu)


def release() -> bytes:
    return bytes(A_RELEASE_RQ().encode())


def abort() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = 0x00, 0x00
    return bytes(pdu.encode())


@cache
def mr_small() -> Dataset:
    """pydicom's ``MR_small.dcm`` (MR Image Storage, 64×64): the dataset the seeds send."""
    return pydicom.dcmread(TEST_FILES / "MR_small.dcm")


def _pdata_streams() -> Iterator[bytes]:
    ds = mr_small()
    explicit = dataset_bytes(ds)
    uid = str(ds.SOPInstanceUID)
    yield echo() + release()
    yield store(explicit, uid) + release()
    yield echo() + store(explicit, uid, max_pdu=1024) + echo(3) + release()
    yield store(explicit[: len(explicit) // 2], uid) + abort()
    yield abort()


def part10_files() -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of pydicom's small little-endian Part 10 test files, preamble byte 0
    set to 1 for implicit VR (the ``scan`` target's convention)."""
    for path in sorted(TEST_FILES.glob("*.dcm")):
        if path.stat().st_size > _MAX_SEED_FILE:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                if not ts.is_little_endian or ts.is_deflated:
                    continue
        except Exception:  # noqa: BLE001, S112 - not a file pydicom reads: no seed
            continue
        data = bytearray(path.read_bytes())
        if data[128:132] != b"DICM":
            continue
        data[0] = 1 if ts == ImplicitVRLittleEndian else 0
        yield path.name, bytes(data)


def hostile_uids() -> dict[str, str]:
    """UIDs that must never become a path: name → value (PS3.5 9.1 allows digits and dots,
    at most 64 characters, no leading zero in a component)."""
    return {
        "dotdot": "../../../../tmp/scanwatch-escaped",
        "dotdot-inside": "1.2.840/../../escaped",
        "slash": "1.2.840/10008",
        "absolute": "/tmp/scanwatch-escaped",
        "backslash": "1.2.840\\10008",
        "nul": "1.2.840\x0010008",
        "newline": "1.2.840.10008\n",
        "too-long": "1." + "2" * 63,
        "letters": "1.2.abc",
        "space": "1.2 3",
        "leading-zero": "1.02.3",
        "empty-component": "1..2",
        "trailing-dot": "1.2.",
        "dot-only": ".",
        "dotdot-only": "..",
    }


def with_uids(ds: Dataset, uids: dict[str, str], implicit: bool = False) -> bytes:
    """``ds`` encoded with some of its UIDs replaced by raw values, byte for byte (pydicom
    would tidy a value it writes: strip a newline, for instance)."""
    copy = deepcopy(ds)  # Dataset.copy() shares the elements
    swaps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid UI value
        for keyword, value in uids.items():
            placeholder = "9" * len(value)
            setattr(copy, keyword, placeholder)
            swaps.append((tag_for_keyword(keyword) or 0, placeholder, value))
    data = dataset_bytes(copy, implicit)
    for tag, placeholder, value in swaps:
        pad = b"\x00" * (len(value) % 2)
        size = len(value) + len(pad)
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        head += struct.pack("<L", size) if implicit else b"UI" + struct.pack("<H", size)
        old, new = head + placeholder.encode() + pad, head + value.encode() + pad
        if data.count(old) != 1:
            raise ValueError(f"cannot place {value!r}")
        data = data.replace(old, new)
    return data


@cache
def seeds(target: str) -> tuple[bytes, ...]:
    """The starting corpus of ``target`` (see the module docstring for the input formats)."""
    ds = mr_small()
    if target == "association":
        rq = associate_rq()
        return (
            *(rq + stream for stream in _pdata_streams()),
            _associate(extra=True) + echo() + release(),
            _associate(called="SOMEONE"),
            _associate(max_pdu=0) + echo(max_pdu=0) + release(),
        )
    if target == "pdata":
        return tuple(_pdata_streams())
    if target == "command":
        return tuple(_commands(stream) for stream in (echo(), store(b"\x08\x00", "1.2.3")))
    if target == "scan":
        return tuple(data for _, data in part10_files())
    if target == "file_meta":
        return (
            b"\x00".join(
                (MRImageStorage.encode(), str(ds.SOPInstanceUID).encode(), b"1.2.840.10008.1.2.1")
            ),
            b"1.2\x00\x00",
        )
    if target == "store":
        hostile = [
            with_uids(ds, {keyword: value})
            for value in hostile_uids().values()
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        ]
        return (
            b"\x00" + dataset_bytes(ds),
            b"\x01" + dataset_bytes(ds, implicit=True),
            *(b"\x00" + data for data in hostile),
        )
    raise KeyError(target)


def _commands(stream: bytes) -> bytes:
    """The first Command Set carried by P-DATA-TF PDUs (reassembled from its PDVs)."""
    command, offset = bytearray(), 0
    while offset + 6 <= len(stream):
        length = int.from_bytes(stream[offset + 2 : offset + 6], "big")
        body, offset = stream[offset + 6 : offset + 6 + length], offset + 6 + length
        inner = 0
        while inner + 6 <= len(body):
            size = int.from_bytes(body[inner : inner + 4], "big")
            control = body[inner + 5]
            if control & 0x01:
                command += body[inner + 6 : inner + 4 + size]
                if control & 0x02:
                    return bytes(command)
            inner += 4 + size
    return bytes(command)
