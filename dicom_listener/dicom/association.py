"""One association, served on the thread that accepted it: negotiation as an SCP, then the
P-DATA-TF loop that answers C-ECHO and streams each C-STORE's dataset to a temporary file.

Negotiation follows the standard as an SCP: a presentation context is accepted when its
abstract syntax is supported, with the first proposed transfer syntax that is (PS3.8 9.3.3.2);
association rejects carry their PS3.8 9.3.4 reason. The hot path reads PDV headers and dataset
chunks into buffers allocated once per association and writes each chunk to the file as it
arrives (no per-PDU allocation beyond the Command Set's).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from dicom_listener.dicom.contract import (
    KEEP_IN_MEMORY_BYTES,
    AdmitFn,
    EventReport,
    NormalizedFn,
    NormalizedRequest,
    Peer,
    ReceivedInstance,
    Status,
    StoreFn,
)
from dicom_listener.dicom.dimse import (
    ACTION_TYPE_ID,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_FIELD,
    DATASET_TYPE,
    EVENT_TYPE_ID,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    N_ACTION_RQ,
    N_ACTION_RSP,
    N_CREATE_RQ,
    N_CREATE_RSP,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    N_SET_RQ,
    N_SET_RSP,
    NO_DATASET,
    REQUESTED_SOP_CLASS,
    REQUESTED_SOP_INSTANCE,
    STATUS,
    WITH_DATASET,
    encode_command,
    parse_command,
    response_command,
    us,
    us_value,
)
from dicom_listener.dicom.file_meta import file_meta_bytes
from dicom_listener.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    APPLICATION_CONTEXT_NOT_SUPPORTED,
    LOCAL_LIMIT_EXCEEDED,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    PROTOCOL_VERSION_NOT_SUPPORTED,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_ACSE_PROVIDER,
    SOURCE_PRESENTATION_PROVIDER,
    SOURCE_SERVICE_USER,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    AssociateRequest,
    ProtocolError,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
    encode_pdu,
    parse_associate_rq,
)
from dicom_listener.dicom.statuses import PROCESSING_FAILURE, SUCCESS
from dicom_listener.dicom.uids import APPLICATION_CONTEXT, VERIFICATION
from dicom_listener.dicom.values import decode_uid, pad_even
from scanwatch.store_layout import is_uid

log = logging.getLogger(__name__)

#: Largest association-negotiation PDU read (hundreds of presentation contexts fit easily).
_MAX_NEGOTIATION_PDU = 1 << 20
#: Largest Command Set accepted (a C-STORE-RQ's is about 150 bytes).
_MAX_COMMAND = 1 << 16
#: Bytes read from the socket per call while a dataset streams to disk.
_CHUNK_BYTES = 1 << 18
#: The acceptor's ARTIM timer after an A-ASSOCIATE-RJ (PS3.8 9.2, state Sta13): how long it
#: waits for the requestor to close the connection before closing it itself (the network
#: timeout, when shorter, bounds it too).
_ARTIM_S = 5.0
#: Largest N-CREATE / N-SET dataset accepted (kept in memory): an MPPS naming thousands of
#: images is a few hundred KiB.
_MAX_NORMALIZED_DATASET = 1 << 23
#: DIMSE-N requests served, with their response's command field and name; and the one response
#: this SCP waits for (to its own N-EVENT-REPORT).
_NORMALIZED = {
    N_CREATE_RQ: (N_CREATE_RSP, "N-CREATE"),
    N_SET_RQ: (N_SET_RSP, "N-SET"),
    N_ACTION_RQ: (N_ACTION_RSP, "N-ACTION"),
    N_EVENT_REPORT_RSP: (0, "N-EVENT-REPORT-RSP"),
}


@dataclass
class ServerConfig:
    """What the server negotiates and where it puts incoming datasets (AE titles are the
    admission function's business)."""

    #: Abstract syntax → transfer syntaxes accepted for it (Verification included).
    contexts: dict[str, frozenset[str]]
    incoming_dir: Path
    #: Opens the file a dataset is received into (path, descriptor open for writing); unset:
    #: a new file in ``incoming_dir``.
    open_incoming: Callable[[], tuple[Path, int]] | None = None
    max_pdu_size: int = 262_144
    max_associations: int = 32
    network_timeout_s: float = 60.0
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False


def _uid_or(command: dict[int, bytes], tag: int, default: str) -> str:
    """The UID ``tag`` of a Command Set, or ``default`` when it is absent or not a UID."""
    value = decode_uid(command.get(tag, b""))
    return value if is_uid(value) else default


class _Incoming:
    """A dataset being received: streamed to a temporary file and hashed on the way.

    A write that fails is remembered, not raised: the remaining fragments are read and
    dropped, and the C-STORE is answered with a failure status.
    """

    def __init__(self, config: ServerConfig, header: bytes) -> None:
        self.path = config.incoming_dir / f"{uuid.uuid4().hex}.tmp"
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None
        self.data: bytearray | None = bytearray()
        self.fd = -1
        try:
            if config.open_incoming is not None:
                self.path, self.fd = config.open_incoming()
            else:
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
    #: An N-CREATE's or N-SET's dataset, received in memory.
    attributes: bytearray | None = None


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
        normalized: NormalizedFn | None = None,
    ) -> None:
        self.sock = sock
        self.address = address
        self.config = config
        self.admit = admit
        self.store = store
        self.slots = slots
        self.on_reject = on_reject
        self.normalized = normalized
        #: This SCP's own request (an N-EVENT-REPORT) not yet answered: its Message ID.
        self._reports: dict[int, EventReport] = {}
        self._next_message_id = 1
        self.accepted: dict[int, tuple[str, str]] = {}
        self.peer_max_pdu = 0
        self.calling = self.called = ""
        #: Set once an A-ABORT has been sent (every protocol error sends one, PS3.8 9.3.8).
        self._aborted = False
        self._header = bytearray(6)
        self._pdv = bytearray(6)
        self._chunk = memoryview(bytearray(_CHUNK_BYTES))
        #: C-STOREs answered on this association: with success, with any other status.
        self.stored = self.refused = 0

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
        kind, length = PDU_HEADER.unpack(self._header)
        if length > limit:
            self._abort(ABORT_INVALID_PARAMETER, f"PDU of {length} bytes exceeds {limit}")
        body = bytearray(length)
        self._read_into(body)
        return kind, body

    def _send_command(self, context_id: int, command: bytes, dataset: bytes = b"") -> None:
        """P-DATA-TF PDUs carrying ``command`` (and then ``dataset``), fragmented to the peer's
        maximum PDU size."""
        parts = self._pdus(context_id, command, 0x01)
        if dataset:
            parts += self._pdus(context_id, dataset, 0x00)
        self.sock.sendall(b"".join(parts))

    def _pdus(self, context_id: int, data: bytes, kind: int) -> list[bytes]:
        step = self.peer_max_pdu - 6 if self.peer_max_pdu > 6 else len(data)
        parts = []
        for start in range(0, len(data), step):
            fragment = data[start : start + step]
            last = 0x02 if start + step >= len(data) else 0x00
            pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, kind | last) + fragment
            parts.append(encode_pdu(P_DATA_TF, pdv))
        return parts

    # -- association --------------------------------------------------------------------
    def serve(self) -> None:
        """Negotiate, then serve DIMSE until release or abort. A :class:`ProtocolError` ends it,
        always after an A-ABORT was sent: the peer is told, whatever broke."""
        try:
            self._serve()
        except ProtocolError:
            if not self._aborted:
                with suppress(OSError):
                    self.sock.sendall(encode_abort(reason=ABORT_INVALID_PARAMETER))
            raise

    def _serve(self) -> None:
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
        started = time.monotonic()
        try:
            self._accept(rq)
            self._serve_dimse()
        finally:
            self.slots.release()
            # One line per association (each instance's own line is DEBUG: at scanner rates
            # it cost 12 % of the listener's CPU); refusals are logged one by one as WARNING.
            log.info(
                "association ended",
                extra={
                    "calling_ae_title": self.calling,
                    "stored": self.stored,
                    "refused": self.refused,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )

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
        self._await_peer_close()
        return False

    def _await_peer_close(self) -> None:
        """Sta13: the requestor closes the connection once it has read the A-ASSOCIATE-RJ.
        Closing at once instead can reach it first, and a peer (pynetdicom) then reports an
        abort, not the rejection; so wait for its close, bounded by the ARTIM timer."""
        self.sock.settimeout(min(_ARTIM_S, self.config.network_timeout_s))
        with suppress(OSError):  # a timeout, or a reset: either way the wait is over
            while self.sock.recv_into(self._chunk):
                pass

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
                kind, remaining = PDU_HEADER.unpack(self._header)
                if kind == A_RELEASE_RQ:
                    if remaining != 4:  # PS3.8 9.3.6: four reserved bytes, nothing else
                        self._abort(ABORT_INVALID_PARAMETER, f"A-RELEASE-RQ of {remaining} bytes")
                    self._read_into(bytearray(remaining))
                    self.sock.sendall(encode_pdu(A_RELEASE_RP, bytes(4)))
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
                    length, context_id, control = PDV_HEADER.unpack(self._pdv)
                    remaining -= 4 + length
                    if length < 2 or remaining < 0 or context_id not in self.accepted:
                        self._abort(ABORT_INVALID_PARAMETER, "PDV: bad length or context")
                    if control & 0x01:  # a command fragment
                        if request is not None:  # PS3.7 9.3.1: its dataset comes first
                            self._abort(ABORT_UNEXPECTED_PDU, "command before the dataset ended")
                        if len(command) + length > _MAX_COMMAND:
                            self._abort(ABORT_INVALID_PARAMETER, "command set too large")
                        fragment = bytearray(length - 2)
                        self._read_into(fragment)
                        command += fragment
                        if control & 0x02:
                            request = self._on_command(context_id, bytes(command))
                            command.clear()
                        continue
                    if request is None:
                        self._abort(ABORT_UNEXPECTED_PDU, "dataset without a request")
                    if context_id != request.context_id:
                        self._abort(ABORT_INVALID_PARAMETER, "dataset on another context")
                    if request.attributes is not None:
                        if len(request.attributes) + length - 2 > _MAX_NORMALIZED_DATASET:
                            self._abort(ABORT_INVALID_PARAMETER, "N- dataset too large")
                        fragment = bytearray(length - 2)
                        self._read_into(fragment)
                        request.attributes += fragment
                        if control & 0x02:
                            self._on_normalized(request)
                            request = None
                        continue
                    assert request.incoming is not None
                    self._copy(length - 2, request.incoming)
                    if control & 0x02:
                        self._on_dataset(request)
                        request = None
        finally:
            if request is not None and request.incoming is not None:
                request.incoming.discard()
            for report in self._reports.values():  # the peer left without answering them
                report.undelivered()

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
        self._aborted = True
        self.sock.sendall(encode_abort(reason=reason))
        raise ProtocolError(why)

    def _on_command(self, context_id: int, raw: bytes) -> _Request | None:
        command = parse_command(raw)
        field_ = us_value(command, COMMAND_FIELD)
        message_id = us_value(command, MESSAGE_ID) or 0
        if field_ == C_ECHO_RQ:
            self._send_command(
                context_id,
                response_command(C_ECHO_RSP, message_id, VERIFICATION, Status(SUCCESS)),
            )
            return None
        if field_ == C_CANCEL_RQ:
            return None
        abstract_syntax, transfer_syntax = self.accepted[context_id]
        if field_ in _NORMALIZED and self.normalized is not None:
            request = _Request(context_id, command, attributes=bytearray())
            if us_value(command, DATASET_TYPE) != NO_DATASET:
                return request  # its dataset follows
            self._on_normalized(request)
            return None
        if field_ != C_STORE_RQ or abstract_syntax == VERIFICATION:
            self._abort(ABORT_UNEXPECTED_PDU, f"unsupported DIMSE command 0x{field_ or 0:04X}")
        if us_value(command, DATASET_TYPE) == NO_DATASET:
            self._abort(ABORT_INVALID_PARAMETER, "C-STORE-RQ without a dataset")
        # The File Meta names only valid UIDs (the request's may be anything); the handler
        # compares the dataset's own with the request's and answers a bad one with a status.
        sop_class = _uid_or(command, AFFECTED_SOP_CLASS, abstract_syntax)
        header = file_meta_bytes(
            sop_class, _uid_or(command, AFFECTED_SOP_INSTANCE, "0"), transfer_syntax
        )
        return _Request(context_id, command, _Incoming(self.config, header))

    def _on_normalized(self, request: _Request) -> None:
        """Hand an N-CREATE or N-SET to its handler and answer with its status (PS3.7 10.1)."""
        assert self.normalized is not None and request.attributes is not None
        context_id, command = request.context_id, request.command
        field_ = us_value(command, COMMAND_FIELD) or 0
        if field_ == N_EVENT_REPORT_RSP:
            self._report_answered(command)
            return
        response_field, name = _NORMALIZED[field_]
        abstract_syntax, transfer_syntax = self.accepted[context_id]
        class_tag, instance_tag = (
            (AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE)
            if field_ == N_CREATE_RQ
            else (REQUESTED_SOP_CLASS, REQUESTED_SOP_INSTANCE)
        )
        sop_class = _uid_or(command, class_tag, abstract_syntax)
        sop_instance = decode_uid(command.get(instance_tag, b""))
        action_type = us_value(command, ACTION_TYPE_ID) if field_ == N_ACTION_RQ else None
        try:
            status, created, report = self.normalized(
                NormalizedRequest(
                    command=name,
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    dataset=bytes(request.attributes),
                    transfer_syntax=transfer_syntax,
                    calling_ae_title=self.calling,
                    called_ae_title=self.called,
                    action_type=action_type,
                )
            )
        except Exception as exc:  # noqa: BLE001 - the sender gets a status, never silence
            log.exception("%s handler failed: %r", name, exc)
            status, created = Status(PROCESSING_FAILURE, "internal error; not recorded"), ""
            report = None
        self._send_command(
            context_id,
            response_command(
                response_field,
                us_value(command, MESSAGE_ID) or 0,
                sop_class,
                status,
                created if is_uid(created) else None,
                extra={ACTION_TYPE_ID: us(action_type)} if action_type is not None else None,
            ),
        )
        if report is not None:
            self._send_report(context_id, report)

    def _send_report(self, context_id: int, report: EventReport) -> None:
        """Send an N-EVENT-REPORT-RQ on this association; its answer is awaited in the loop."""
        message_id, self._next_message_id = self._next_message_id, self._next_message_id + 1
        command = encode_command(
            {
                AFFECTED_SOP_CLASS: pad_even(report.sop_class_uid.encode(), b"\x00"),
                COMMAND_FIELD: us(N_EVENT_REPORT_RQ),
                MESSAGE_ID: us(message_id),
                DATASET_TYPE: us(WITH_DATASET),
                AFFECTED_SOP_INSTANCE: pad_even(report.sop_instance_uid.encode(), b"\x00"),
                EVENT_TYPE_ID: us(report.event_type),
            }
        )
        self._reports[message_id] = report
        self._send_command(context_id, command, report.dataset)

    def _report_answered(self, command: dict[int, bytes]) -> None:
        report = self._reports.pop(us_value(command, MESSAGE_ID_BEING_RESPONDED_TO) or -1, None)
        if report is None:
            return  # an answer to nothing this association sent: ignored
        status = us_value(command, STATUS)
        if status != SUCCESS:
            log.warning("event report refused by the peer", extra={"status": status})
            report.undelivered()

    def _on_dataset(self, request: _Request) -> None:
        incoming = request.incoming
        assert incoming is not None
        request.incoming = None
        abstract_syntax, transfer_syntax = self.accepted[request.context_id]
        sop_instance = decode_uid(request.command.get(AFFECTED_SOP_INSTANCE, b""))
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
                self.stored += 1
            else:
                incoming.discard()
                self.refused += 1
        # Affected SOP Class and Instance UID are echoed (PS3.7 9.3.1.2) when they are UIDs.
        self._send_command(
            request.context_id,
            response_command(
                C_STORE_RSP,
                us_value(request.command, MESSAGE_ID) or 0,
                _uid_or(request.command, AFFECTED_SOP_CLASS, abstract_syntax),
                status,
                _uid_or(request.command, AFFECTED_SOP_INSTANCE, ""),
            ),
        )
