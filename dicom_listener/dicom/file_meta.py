"""The Part 10 header written before a received dataset (PS3.10 7.1), so that the temporary
file the handler gets is a complete DICOM file, byte for byte the dataset as received."""

from __future__ import annotations

import struct

from dicom_listener.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_listener.dicom.values import pad_even
from scanwatch.store_layout import check_uid


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, explicit VR little endian (PS3.10 7.1)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a received dataset.

    Raises ``ValueError`` when a value is not a UID (PS3.5 9.1): the association passes only
    UIDs it checked or negotiated.
    """
    for keyword, value in (
        ("MediaStorageSOPClassUID", sop_class),
        ("MediaStorageSOPInstanceUID", sop_instance),
        ("TransferSyntaxUID", transfer_syntax),
    ):
        check_uid(keyword, value)
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", pad_even(sop_class.encode(), b"\x00")),
            _meta_element(0x0003, b"UI", pad_even(sop_instance.encode(), b"\x00")),
            _meta_element(0x0010, b"UI", pad_even(transfer_syntax.encode(), b"\x00")),
            _meta_element(0x0012, b"UI", pad_even(IMPLEMENTATION_CLASS_UID.encode(), b"\x00")),
            _meta_element(0x0013, b"SH", pad_even(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<L", len(body)))
    return bytes(128) + b"DICM" + group_length + body
