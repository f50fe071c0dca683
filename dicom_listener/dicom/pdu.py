"""The Upper Layer's PDU codec (PS3.8 9.3): association negotiation, reject, abort, and the
headers of P-DATA-TF. Pure bytes in, bytes out; the association does the I/O."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dicom_listener.dicom.uids import (
    APPLICATION_CONTEXT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from dicom_listener.dicom.values import decode_uid

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, diagnostic.
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_SERVICE_USER, SOURCE_ACSE_PROVIDER, SOURCE_PRESENTATION_PROVIDER = 0x01, 0x02, 0x03
#: Service-user diagnostics.
NO_REASON_GIVEN = 0x01
APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
CALLING_AE_NOT_RECOGNIZED = 0x03
CALLED_AE_NOT_RECOGNIZED = 0x07
#: ACSE-provider diagnostic.
PROTOCOL_VERSION_NOT_SUPPORTED = 0x02
#: Presentation-provider diagnostic.
LOCAL_LIMIT_EXCEEDED = 0x02

# Presentation context results in A-ASSOCIATE-AC (PS3.8 9.3.3.2).
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ABORT source and reason (PS3.8 9.3.8).
ABORT_SOURCE_PROVIDER = 0x02
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

#: PDU header: type, reserved, length (PS3.8 9.3.1).
PDU_HEADER = struct.Struct(">BxL")
#: Presentation Data Value item header: length, context id, message control header (9.3.5.1).
PDV_HEADER = struct.Struct(">LBB")
_ITEM_HEADER = struct.Struct(">BxH")


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted."""


@dataclass
class ProposedContext:
    """One presentation context of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ (PS3.8 9.3.2) that negotiation uses."""

    protocol_version: int
    called_ae_title: str
    calling_ae_title: str
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    #: The requestor's largest receivable P-DATA PDU (0: unlimited).
    max_pdu_size: int = 0
    raw_called: bytes = b""
    raw_calling: bytes = b""


def _items(body: memoryview) -> list[tuple[int, memoryview]]:
    out, offset = [], 0
    while offset < len(body):
        if offset + 4 > len(body):
            raise ProtocolError("truncated item header")
        kind, length = _ITEM_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if end > len(body):
            raise ProtocolError("item runs past its PDU")
        out.append((kind, body[offset + 4 : end]))
        offset = end
    return out


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode the variable part of an A-ASSOCIATE-RQ PDU (after its 6-byte header)."""
    view = memoryview(body)
    if len(view) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    raw_called, raw_calling = bytes(view[4:20]), bytes(view[20:36])
    rq = AssociateRequest(
        protocol_version=int.from_bytes(view[0:2], "big"),
        called_ae_title=raw_called.decode("ascii", "replace").strip(),
        calling_ae_title=raw_calling.decode("ascii", "replace").strip(),
        raw_called=raw_called,
        raw_calling=raw_calling,
    )
    for kind, item in _items(view[68:]):
        if kind == 0x10:
            rq.application_context = decode_uid(item)
        elif kind == 0x20:
            if len(item) < 4:
                raise ProtocolError("presentation context item too short")
            proposed = ProposedContext(item[0], "", [])
            for sub_kind, sub in _items(item[4:]):
                if sub_kind == 0x30:
                    proposed.abstract_syntax = decode_uid(sub)
                elif sub_kind == 0x40:
                    proposed.transfer_syntaxes.append(decode_uid(sub))
            rq.contexts.append(proposed)
        elif kind == 0x50:
            for sub_kind, sub in _items(item):
                if sub_kind == 0x51 and len(sub) == 4:
                    rq.max_pdu_size = int.from_bytes(sub, "big")
    return rq


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(kind, len(value)) + value


def encode_pdu(kind: int, body: bytes) -> bytes:
    """A PDU of type ``kind`` around ``body``."""
    return PDU_HEADER.pack(kind, len(body)) + body


def encode_associate_ac(
    rq: AssociateRequest, results: list[tuple[int, int, str]], max_pdu_size: int
) -> bytes:
    """A-ASSOCIATE-AC for ``results``: ``(context id, result, transfer syntax)`` each."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for context_id, result, syntax in results:
        sub = _item(0x40, syntax.encode()) if result == ACCEPTANCE else b""
        items.append(_item(0x21, bytes([context_id, 0, result, 0]) + sub))
    version = IMPLEMENTATION_VERSION_NAME.encode()
    user = (
        _item(0x51, max_pdu_size.to_bytes(4, "big"))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
        + _item(0x55, version)
    )
    items.append(_item(0x50, user))
    head = b"\x00\x01\x00\x00" + rq.raw_called + rq.raw_calling + bytes(32)
    return encode_pdu(A_ASSOCIATE_AC, head + b"".join(items))


def encode_associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    return encode_pdu(A_ASSOCIATE_RJ, bytes([0, result, source, diagnostic]))


def encode_abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = 0) -> bytes:
    return encode_pdu(A_ABORT, bytes([0, 0, source, reason]))
