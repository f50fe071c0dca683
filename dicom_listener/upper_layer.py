"""The DICOM network side of the listener: Upper Layer (PS3.8) and the two DIMSE services a
Storage SCP needs (C-STORE and C-ECHO, PS3.7), one blocking thread per association.

Why not pynetdicom's AE: its DUL and association reactors poll with 1 ms sleeps and two
threads per association, which capped even its bare ``storescp`` at 0.46x Orthanc's rate on
this project's machines (``bench/ingest.md``). Here a thread blocks in ``recv`` on its socket,
each P-DATA fragment of a dataset goes straight to a temporary file while being hashed, and the
response leaves as soon as the store handler returns; nothing polls.

Negotiation follows the standard as an SCP: a presentation context is accepted when its
abstract syntax is supported, with the first proposed transfer syntax that is (PS3.8 9.3.3.2);
association rejects carry their PS3.8 9.3.4 reason. The handler never sees a socket: it gets a
:class:`ReceivedInstance` (a Part 10 file, not yet fsync'd) and returns a status.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import socketserver
import ssl
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, NoReturn

from scanwatch.ids import NAMESPACE

log = logging.getLogger(__name__)

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

#: The only application context of DICOM (PS3.7 A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"
#: This implementation's identity in A-ASSOCIATE-AC and file meta (a UUID-derived UID, PS3.5
#: B.2, so that no organisational root is needed).
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(NAMESPACE, 'dicom-listener').int}"
IMPLEMENTATION_VERSION_NAME = "SCANWATCH_1"

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

# DIMSE (PS3.7 9.3 and 9.1).
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
#: Status: Processing failure (PS3.7 C.4), for a handler that failed unexpectedly.
PROCESSING_FAILURE = 0x0110
SUCCESS = 0x0000

# Command Set tags (group 0000).
_GROUP_LENGTH = 0x00000000
_AFFECTED_SOP_CLASS = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
_DATASET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE = 0x00001000

#: Largest association-negotiation PDU read (hundreds of presentation contexts fit easily).
_MAX_NEGOTIATION_PDU = 1 << 20
#: Largest Command Set accepted (a C-STORE-RQ's is about 150 bytes).
_MAX_COMMAND = 1 << 16
#: Bytes read from the socket per call while a dataset streams to disk.
_CHUNK_BYTES = 1 << 18
#: Datasets up to this size are also kept in memory while they stream to disk, so that the
#: handler identifies them without reading the file back (at most this much per association).
KEEP_IN_MEMORY_BYTES = 1 << 21
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_ITEM_HEADER = struct.Struct(">BxH")
_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted."""


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE's dataset, received in full as a Part 10 file under a temporary name;
    written, not yet fsync'd: the handler makes it durable before it answers success.

    ``sop_class_uid`` and ``transfer_syntax`` are the negotiated presentation context's. A
    handler that answers success has taken ``path`` (moved it into the store, or removed it);
    after any other answer the association removes it.
    """

    path: Path
    sha256: str
    size_bytes: int
    sop_class_uid: str
    transfer_syntax: str
    affected_sop_instance_uid: str
    calling_ae_title: str
    called_ae_title: str
    #: Set when the bytes could not be written (disk full, I/O error): the rest of the
    #: dataset was read and dropped so that the association can answer with a status.
    write_error: OSError | None = None
    #: The file's bytes, when it is at most ``KEEP_IN_MEMORY_BYTES`` long.
    data: bytes | bytearray | None = None
    #: The file, still open for writing (the handler fsyncs through it; the association
    #: closes it once the handler returns), or -1.
    fd: int = -1


class Status(NamedTuple):
    """A DIMSE response status and its Error Comment (named as the DICOM keywords)."""

    Status: int
    ErrorComment: str | None = None


@dataclass(frozen=True)
class Peer:
    """Who asks for an association, as the admission check sees it."""

    called_ae_title: str
    calling_ae_title: str
    address: str


#: ``(diagnostic, reason)`` when an association must be rejected by the service user, else None.
AdmitFn = Callable[[Peer], tuple[int, str] | None]
StoreFn = Callable[[ReceivedInstance], Status]


@dataclass
class ServerConfig:
    """What the server negotiates and where it puts incoming datasets (AE titles are the
    admission function's business)."""

    #: Abstract syntax → transfer syntaxes accepted for it (Verification included).
    contexts: dict[str, frozenset[str]]
    incoming_dir: Path
    max_pdu_size: int = 262_144
    max_associations: int = 32
    network_timeout_s: float = 60.0
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False


@dataclass
class _Proposed:
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
    contexts: list[_Proposed] = field(default_factory=list)
    #: The requestor's largest receivable P-DATA PDU (0: unlimited).
    max_pdu_size: int = 0
    raw_called: bytes = b""
    raw_calling: bytes = b""


def _uid(raw: bytes | memoryview) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


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
            rq.application_context = _uid(item)
        elif kind == 0x20:
            if len(item) < 4:
                raise ProtocolError("presentation context item too short")
            proposed = _Proposed(item[0], "", [])
            for sub_kind, sub in _items(item[4:]):
                if sub_kind == 0x30:
                    proposed.abstract_syntax = _uid(sub)
                elif sub_kind == 0x40:
                    proposed.transfer_syntaxes.append(_uid(sub))
            rq.contexts.append(proposed)
        elif kind == 0x50:
            for sub_kind, sub in _items(item):
                if sub_kind == 0x51 and len(sub) == 4:
                    rq.max_pdu_size = int.from_bytes(sub, "big")
    return rq


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(kind, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return _PDU_HEADER.pack(kind, len(body)) + body


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
    return _pdu(A_ASSOCIATE_AC, head + b"".join(items))


def encode_associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes([0, result, source, diagnostic]))


def encode_abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = 0) -> bytes:
    return _pdu(A_ABORT, bytes([0, 0, source, reason]))


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


def _us(command: dict[int, bytes], tag: int) -> int | None:
    raw = command.get(tag)
    return _US.unpack(raw)[0] if raw is not None and len(raw) == 2 else None


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


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
) -> bytes:
    elements = {
        _AFFECTED_SOP_CLASS: _even(sop_class.encode(), b"\x00"),
        _COMMAND_FIELD: _US.pack(command_field),
        _MESSAGE_ID_BEING_RESPONDED_TO: _US.pack(message_id),
        _DATASET_TYPE: _US.pack(NO_DATASET),
        _STATUS: _US.pack(status.Status),
    }
    if sop_instance:
        elements[_AFFECTED_SOP_INSTANCE] = _even(sop_instance.encode(), b"\x00")
    if status.ErrorComment:
        elements[_ERROR_COMMENT] = _even(status.ErrorComment[:64].encode("ascii", "replace"), b" ")
    return encode_command(elements)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, explicit VR little endian (PS3.10 7.1)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a received dataset."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _even(sop_class.encode(), b"\x00")),
            _meta_element(0x0003, b"UI", _even(sop_instance.encode(), b"\x00")),
            _meta_element(0x0010, b"UI", _even(transfer_syntax.encode(), b"\x00")),
            _meta_element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID.encode(), b"\x00")),
            _meta_element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode(), b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<L", len(body)))
    return bytes(128) + b"DICM" + group_length + body


class _Incoming:
    """A dataset being received: streamed to a temporary file and hashed on the way.

    A write that fails is remembered, not raised: the remaining fragments are read and
    dropped, and the C-STORE is answered with a failure status.
    """

    def __init__(self, folder: Path, header: bytes) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.tmp"
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None
        self.data: bytearray | None = bytearray()
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            self.error = exc
        self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        if self.error is not None:
            return
        self.digest.update(data)
        self.size += len(data)
        if self.data is not None:
            if self.size <= KEEP_IN_MEMORY_BYTES:
                self.data += data
            else:
                self.data = None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        self.data = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        with suppress(OSError):  # never written, or its folder is gone
            self.path.unlink(missing_ok=True)


@dataclass
class _Request:
    context_id: int
    command: dict[int, bytes]
    incoming: _Incoming | None = None


class Association:
    """One association, served on the calling thread until release, abort or timeout."""

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        config: ServerConfig,
        admit: AdmitFn,
        store: StoreFn,
        slots: threading.BoundedSemaphore,
        on_reject: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self.address = address
        self.config = config
        self.admit = admit
        self.store = store
        self.slots = slots
        self.on_reject = on_reject
        self.accepted: dict[int, tuple[str, str]] = {}
        self.peer_max_pdu = 0
        self.calling = self.called = ""
        self._header = bytearray(6)
        self._pdv = bytearray(6)
        self._chunk = memoryview(bytearray(_CHUNK_BYTES))

    # -- socket -------------------------------------------------------------------------
    def _read_into(self, buffer: bytearray | memoryview) -> None:
        view, got = memoryview(buffer), 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("peer closed the connection")
            got += n

    def _read_pdu(self, limit: int) -> tuple[int, bytearray]:
        self._read_into(self._header)
        kind, length = _PDU_HEADER.unpack(self._header)
        if length > limit:
            self._abort(ABORT_INVALID_PARAMETER, f"PDU of {length} bytes exceeds {limit}")
        body = bytearray(length)
        self._read_into(body)
        return kind, body

    def _send_command(self, context_id: int, command: bytes) -> None:
        """P-DATA-TF PDUs carrying ``command``, fragmented to the peer's maximum PDU size."""
        step = self.peer_max_pdu - 6 if self.peer_max_pdu > 6 else len(command)
        parts = []
        for start in range(0, len(command), step):
            fragment = command[start : start + step]
            last = 0x02 if start + step >= len(command) else 0x00
            pdv = _PDV_HEADER.pack(len(fragment) + 2, context_id, 0x01 | last) + fragment
            parts.append(_pdu(P_DATA_TF, pdv))
        self.sock.sendall(b"".join(parts))

    # -- association --------------------------------------------------------------------
    def serve(self) -> None:
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(self.config.network_timeout_s)
        else:
            # The kernel times out each receive and send (EAGAIN, seen as BlockingIOError):
            # a Python socket timeout would add a poll() before every recv().
            self.sock.settimeout(None)
            seconds = int(self.config.network_timeout_s)
            micros = int((self.config.network_timeout_s - seconds) * 1e6)
            timeval = struct.pack("ll", seconds, micros)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        kind, body = self._read_pdu(_MAX_NEGOTIATION_PDU)
        if kind != A_ASSOCIATE_RQ:
            self._abort(ABORT_UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU type {kind}")
        rq = parse_associate_rq(bytes(body))
        self.calling, self.called = rq.calling_ae_title, rq.called_ae_title
        if not self._admitted(rq):
            return
        try:
            self._accept(rq)
            self._serve_dimse()
        finally:
            self.slots.release()

    def _reject(self, result: int, source: int, diagnostic: int, reason: str) -> bool:
        self.on_reject(reason)
        log.warning(
            "association rejected: %s",
            reason,
            extra={
                "reason": reason,
                "calling_ae_title": self.calling,
                "called_ae_title": self.called,
                "peer_address": self.address,
            },
        )
        self.sock.sendall(encode_associate_rj(result, source, diagnostic))
        return False

    def _admitted(self, rq: AssociateRequest) -> bool:
        """Reject with the reason and return False, or take an association slot."""
        if not rq.protocol_version & 0x0001:
            return self._reject(
                REJECTED_PERMANENT,
                SOURCE_ACSE_PROVIDER,
                PROTOCOL_VERSION_NOT_SUPPORTED,
                "protocol_version_not_supported",
            )
        if rq.application_context != APPLICATION_CONTEXT:
            return self._reject(
                REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                APPLICATION_CONTEXT_NOT_SUPPORTED,
                "application_context_not_supported",
            )
        verdict = self.admit(Peer(rq.called_ae_title, rq.calling_ae_title, self.address))
        if verdict is not None:
            diagnostic, reason = verdict
            return self._reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic, reason)
        if not self.slots.acquire(blocking=False):
            return self._reject(
                REJECTED_TRANSIENT,
                SOURCE_PRESENTATION_PROVIDER,
                LOCAL_LIMIT_EXCEEDED,
                "too_many_associations",
            )
        return True

    def _accept(self, rq: AssociateRequest) -> None:
        results = []
        for proposed in rq.contexts:
            supported = self.config.contexts.get(proposed.abstract_syntax)
            if supported is None:
                results.append((proposed.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
                continue
            chosen = next((ts for ts in proposed.transfer_syntaxes if ts in supported), None)
            if chosen is None:
                results.append((proposed.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
                continue
            results.append((proposed.context_id, ACCEPTANCE, chosen))
            self.accepted[proposed.context_id] = (proposed.abstract_syntax, chosen)
        self.peer_max_pdu = rq.max_pdu_size
        self.sock.sendall(encode_associate_ac(rq, results, self.config.max_pdu_size))
        log.debug(
            "association accepted",
            extra={"calling_ae_title": self.calling, "accepted_contexts": len(self.accepted)},
        )

    def _serve_dimse(self) -> None:
        """P-DATA-TF until release or abort. PDVs are read as they arrive, so memory use is
        one chunk whatever the PDU size (``max_pdu_size`` 0 means unlimited)."""
        command = bytearray()
        request: _Request | None = None
        limit = self.config.max_pdu_size
        try:
            while True:
                self._read_into(self._header)
                kind, remaining = _PDU_HEADER.unpack(self._header)
                if kind == A_RELEASE_RQ:
                    self._read_into(bytearray(remaining))
                    self.sock.sendall(_pdu(A_RELEASE_RP, bytes(4)))
                    return
                if kind == A_ABORT:
                    log.info("association aborted by the peer", extra={"peer": self.calling})
                    return
                if kind != P_DATA_TF:
                    self._abort(ABORT_UNEXPECTED_PDU, f"unexpected PDU type {kind}")
                if limit and remaining > limit:
                    self._abort(ABORT_INVALID_PARAMETER, f"P-DATA-TF of {remaining} bytes")
                while remaining:
                    if remaining < 6:
                        self._abort(ABORT_INVALID_PARAMETER, "truncated PDV")
                    self._read_into(self._pdv)
                    length, context_id, control = _PDV_HEADER.unpack(self._pdv)
                    remaining -= 4 + length
                    if length < 2 or remaining < 0 or context_id not in self.accepted:
                        self._abort(ABORT_INVALID_PARAMETER, "PDV: bad length or context")
                    if control & 0x01:  # a command fragment
                        if len(command) + length > _MAX_COMMAND:
                            self._abort(ABORT_INVALID_PARAMETER, "command set too large")
                        fragment = bytearray(length - 2)
                        self._read_into(fragment)
                        command += fragment
                        if control & 0x02:
                            request = self._on_command(context_id, bytes(command))
                            command.clear()
                        continue
                    if request is None or request.incoming is None:
                        self._abort(ABORT_UNEXPECTED_PDU, "dataset without a C-STORE request")
                    if context_id != request.context_id:
                        self._abort(ABORT_INVALID_PARAMETER, "dataset on another context")
                    self._copy(length - 2, request.incoming)
                    if control & 0x02:
                        self._on_dataset(request)
                        request = None
        finally:
            if request is not None and request.incoming is not None:
                request.incoming.discard()

    def _copy(self, size: int, incoming: _Incoming) -> None:
        """Read ``size`` bytes of a dataset fragment into ``incoming``, a chunk at a time."""
        buffer = self._chunk
        while size:
            n = self.sock.recv_into(buffer, min(size, len(buffer)))
            if n == 0:
                raise ConnectionError("peer closed the connection")
            incoming.write(buffer[:n])
            size -= n

    def _abort(self, reason: int, why: str) -> NoReturn:
        self.sock.sendall(encode_abort(reason=reason))
        raise ProtocolError(why)

    def _on_command(self, context_id: int, raw: bytes) -> _Request | None:
        command = parse_command(raw)
        field_ = _us(command, _COMMAND_FIELD)
        message_id = _us(command, _MESSAGE_ID) or 0
        if field_ == C_ECHO_RQ:
            self._send_command(
                context_id,
                response_command(C_ECHO_RSP, message_id, VERIFICATION, Status(SUCCESS)),
            )
            return None
        if field_ == C_CANCEL_RQ:
            return None
        abstract_syntax, transfer_syntax = self.accepted[context_id]
        if field_ != C_STORE_RQ or abstract_syntax == VERIFICATION:
            self._abort(ABORT_UNEXPECTED_PDU, f"unsupported DIMSE command 0x{field_ or 0:04X}")
        if _us(command, _DATASET_TYPE) == NO_DATASET:
            self._abort(ABORT_INVALID_PARAMETER, "C-STORE-RQ without a dataset")
        sop_class = _uid(command.get(_AFFECTED_SOP_CLASS, b"")) or abstract_syntax
        sop_instance = _uid(command.get(_AFFECTED_SOP_INSTANCE, b""))
        header = file_meta_bytes(sop_class, sop_instance or "0", transfer_syntax)
        return _Request(context_id, command, _Incoming(self.config.incoming_dir, header))

    def _on_dataset(self, request: _Request) -> None:
        incoming = request.incoming
        assert incoming is not None
        request.incoming = None
        abstract_syntax, transfer_syntax = self.accepted[request.context_id]
        sop_instance = _uid(request.command.get(_AFFECTED_SOP_INSTANCE, b""))
        status = Status(PROCESSING_FAILURE, "internal error; not stored")
        try:
            received = ReceivedInstance(
                path=incoming.path,
                sha256=incoming.digest.hexdigest(),
                size_bytes=incoming.size,
                sop_class_uid=abstract_syntax,
                transfer_syntax=transfer_syntax,
                affected_sop_instance_uid=sop_instance,
                calling_ae_title=self.calling,
                called_ae_title=self.called,
                write_error=incoming.error,
                data=incoming.data,
                fd=incoming.fd,
            )
            status = self.store(received)
        except Exception as exc:  # noqa: BLE001 - the sender gets a status, never silence
            log.exception("C-STORE handler failed: %r", exc)
        finally:
            # On success the handler has taken the file; an unlink that finds nothing still
            # locks .incoming against the other associations' creates.
            if status.Status == SUCCESS:
                incoming.close()
            else:
                incoming.discard()
        sop_class = _uid(request.command.get(_AFFECTED_SOP_CLASS, b"")) or abstract_syntax
        self._send_command(
            request.context_id,
            response_command(
                C_STORE_RSP,
                _us(request.command, _MESSAGE_ID) or 0,
                sop_class,
                status,
                sop_instance,
            ),
        )


class _Handler(socketserver.BaseRequestHandler):
    server: StorageServer

    def handle(self) -> None:
        server = self.server
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = str(self.client_address[0])
        try:
            if server.config.ssl_context is not None:
                sock.settimeout(server.config.network_timeout_s)
                sock = server.config.ssl_context.wrap_socket(sock, server_side=True)
            with server.tracked():
                Association(
                    sock,
                    address,
                    server.config,
                    server.admit,
                    server.store,
                    server.slots,
                    server.on_reject,
                ).serve()
        except (ProtocolError, ssl.SSLError) as exc:
            log.warning("association aborted: %s", exc, extra={"peer_address": address})
        except (ConnectionError, TimeoutError, BlockingIOError) as exc:
            # BlockingIOError: the network timeout (SO_RCVTIMEO / SO_SNDTIMEO) passed.
            log.info("association ended: %r", exc, extra={"peer_address": address})
        finally:
            try:
                sock.close()
            except OSError:
                pass
            server.on_association_end()


class StorageServer(socketserver.ThreadingTCPServer):
    """Accepts associations, one daemon thread each; ``serve_forever`` runs the accept loop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        config: ServerConfig,
        admit: AdmitFn,
        store: StoreFn,
        host: str,
        port: int,
        on_reject: Callable[[str], None] = lambda reason: None,
        on_association_end: Callable[[], None] = lambda: None,
    ):
        self.config = config
        self.admit = admit
        self.store = store
        self.on_reject = on_reject
        #: Called once an association is over (released, aborted or refused): its sender
        #: has nothing more in flight, so what it stored can be published without waiting.
        self.on_association_end = on_association_end
        self.slots = threading.BoundedSemaphore(config.max_associations)
        self._active = 0
        self._lock = threading.Lock()
        config.incoming_dir.mkdir(parents=True, exist_ok=True)
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        if self.config.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def active_associations(self) -> int:
        """Connections being served (negotiating or associated)."""
        return self._active

    @contextmanager
    def tracked(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
