"""DIMSE Command Sets (PS3.7 9.3 and Annex E): decoding a request's, encoding a response's.

Command Sets are always implicit VR little endian (PS3.7 6.3.1); values are kept as raw bytes
and decoded only where a field is needed.
"""

from __future__ import annotations

import struct

from dicom_listener.dicom.contract import Status
from dicom_listener.dicom.pdu import ProtocolError
from dicom_listener.dicom.values import pad_even

# Command Field values (PS3.7 9.3 and E.1).
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
# DIMSE-N (PS3.7 10.3): the Modality Performed Procedure Step's two messages.
N_SET_RQ, N_SET_RSP = 0x0120, 0x8120
N_CREATE_RQ, N_CREATE_RSP = 0x0140, 0x8140
# ... and Storage Commitment's: the request, and the result reported back (PS3.4 J.3).
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
#: Command Data Set Type: a dataset follows (any value but NO_DATASET, PS3.7 E.1).
WITH_DATASET = 0x0001
#: Command Data Set Type: no dataset follows (PS3.7 E.1).
NO_DATASET = 0x0101

# Command Set tags (group 0000).
GROUP_LENGTH = 0x00000000
AFFECTED_SOP_CLASS = 0x00000002
REQUESTED_SOP_CLASS = 0x00000003
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000
REQUESTED_SOP_INSTANCE = 0x00001001
EVENT_TYPE_ID = 0x00001002
ACTION_TYPE_ID = 0x00001008

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")


def parse_command(data: bytes) -> dict[int, bytes]:
    """A Command Set (implicit VR little endian, PS3.7 6.3.1) as tag → raw value."""
    elements, offset = {}, 0
    while offset + 8 <= len(data):
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if offset + length > len(data):
            raise ProtocolError("command element runs past the command set")
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return elements


def us_value(command: dict[int, bytes], tag: int) -> int | None:
    """The US value of ``tag`` in a parsed Command Set, or None when absent or malformed."""
    raw = command.get(tag)
    return _US.unpack(raw)[0] if raw is not None and len(raw) == 2 else None


def encode_command(elements: dict[int, bytes]) -> bytes:
    """A Command Set from tag → encoded value, group length first, in tag order."""
    body = b"".join(
        _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value
        for tag, value in sorted(elements.items())
    )
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def response_command(
    command_field: int,
    message_id: int,
    sop_class: str,
    status: Status,
    sop_instance: str | None = None,
    extra: dict[int, bytes] | None = None,
) -> bytes:
    """The Command Set of a response without a dataset (C-STORE-RSP, C-ECHO-RSP, N-CREATE-RSP,
    N-SET-RSP: PS3.7 10.3 lets an N-response leave its attribute list out)."""
    elements = {
        AFFECTED_SOP_CLASS: pad_even(sop_class.encode(), b"\x00"),
        COMMAND_FIELD: _US.pack(command_field),
        MESSAGE_ID_BEING_RESPONDED_TO: _US.pack(message_id),
        DATASET_TYPE: _US.pack(NO_DATASET),
        STATUS: _US.pack(status.Status),
    }
    if sop_instance:
        elements[AFFECTED_SOP_INSTANCE] = pad_even(sop_instance.encode(), b"\x00")
    elements.update(extra or {})
    if status.ErrorComment:
        elements[ERROR_COMMENT] = pad_even(
            status.ErrorComment[:64].encode("ascii", "replace"), b" "
        )
    return encode_command(elements)


def us(value: int) -> bytes:
    """A US value as a Command Set carries it."""
    return _US.pack(value)
