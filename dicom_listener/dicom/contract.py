"""What the network layer hands a handler and what it takes back: the handler contract.

A store handler never sees a socket: it gets a :class:`ReceivedInstance` (a Part 10 file, not
yet fsync'd) and returns a :class:`Status`. An admission function gets the :class:`Peer` of an
A-ASSOCIATE-RQ and returns why to reject it, or None. This module imports nothing of the
network side, so handlers and policies depend on it alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

#: Datasets up to this size are also kept in memory while they stream to disk, so that the
#: handler identifies them without reading the file back (at most this much per association).
KEEP_IN_MEMORY_BYTES = 1 << 21


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


#: ``(diagnostic, reason)`` when an association must be rejected by the service user (an
#: A-ASSOCIATE-RJ service-user diagnostic of PS3.8 9.3.4, and a label for logs and metrics),
#: else None.
AdmitFn = Callable[[Peer], tuple[int, str] | None]
#: The C-STORE handler: answers every received instance with a status, never an exception.
StoreFn = Callable[[ReceivedInstance], Status]


@dataclass(frozen=True)
class NormalizedRequest:
    """An N-CREATE or N-SET request (DIMSE-N, PS3.7 10.1) and its dataset, as received.

    ``sop_instance_uid`` is the request's Affected (N-CREATE) or Requested (N-SET) SOP Instance
    UID: empty when an N-CREATE leaves it to the SCP to assign. ``dataset`` is the encoded
    attribute list in ``transfer_syntax`` (empty when none was sent).
    """

    command: str  # "N-CREATE", "N-SET" or "N-ACTION"
    sop_class_uid: str
    sop_instance_uid: str
    dataset: bytes
    transfer_syntax: str
    calling_ae_title: str
    called_ae_title: str
    #: An N-ACTION's Action Type ID.
    action_type: int | None = None


@dataclass(frozen=True)
class EventReport:
    """An N-EVENT-REPORT the SCP sends the peer after answering its request (Storage
    Commitment's result, PS3.4 J.3.3): on the same association, then ``undelivered`` is called
    if the peer did not answer it there (it released or aborted first)."""

    sop_class_uid: str
    sop_instance_uid: str
    event_type: int
    dataset: bytes  # encoded in the request's transfer syntax
    undelivered: Callable[[], None]


class NormalizedResponse(NamedTuple):
    """The status of an N-CREATE, N-SET or N-ACTION, the SOP Instance it created or acted on,
    and an event report to send after it."""

    status: Status
    sop_instance_uid: str = ""
    report: EventReport | None = None


#: The N-CREATE / N-SET / N-ACTION handler: answers every request with a response, never an
#: exception.
NormalizedFn = Callable[[NormalizedRequest], NormalizedResponse]
