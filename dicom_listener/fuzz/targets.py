"""The fuzz targets: one property per parser of the listener, over one input's bytes.

A target returns when the code under test behaved as documented for that input, raises
:class:`Finding` when it answered wrongly, and lets any undocumented exception escape (a crash,
for atheris). Input formats: :mod:`dicom_listener.fuzz.seeds`.

* ``association``: what a peer sends on one connection, served by the real
  :class:`~dicom_listener.dicom.association.Association` over an in-memory socket (PDU
  decoding, A-ASSOCIATE-RQ parsing and negotiation, DIMSE Command Sets, P-DATA reassembly, the
  file meta of each dataset). It may end the association only with a :class:`ProtocolError`
  (after sending an A-ABORT) or because the input ran out; every answer it sent is a
  well-formed PDU (its A-ASSOCIATE-AC decoded by pynetdicom, its responses' Command Sets by
  pydicom), no temporary file or association slot is left behind, and each dataset handed to
  the store function is a Part 10 file pydicom reads the File Meta of.
* ``pdata``: the same after a fixed, valid A-ASSOCIATE-RQ (so that mutations go to P-DATA).
* ``command``: :func:`~dicom_listener.dicom.dimse.parse_command` raises only
  :class:`ProtocolError`; what it returns encodes back to itself.
* ``file_meta``: :func:`~dicom_listener.dicom.file_meta.file_meta_bytes` of three values as
  the association decodes them: ``ValueError`` exactly when one is not a UID, else a header
  pydicom reads back to the same values.
* ``scan``: :func:`~scanwatch.dicom_scan.scan_part10` raises only ``Truncated`` /
  ``Undecodable``; where pydicom reads the whole file (every element within the bytes), the
  scan's values are pydicom's, byte for byte, and it does not call the file truncated.
* ``store``: the real C-STORE handler with a real file store and outbox: a documented status;
  success only for valid UIDs, with the file at its layout path; a refusal records no event;
  nothing is opened for writing, created or renamed outside the store root.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import shutil
import struct
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom.pdu import A_ASSOCIATE_AC as PynetdicomAssociateAC

from dicom_listener.adapters.filestore import FileStore, Quarantine
from dicom_listener.adapters.outbox import Outbox
from dicom_listener.dicom import statuses
from dicom_listener.dicom.association import Association, ServerConfig
from dicom_listener.dicom.contract import ReceivedInstance, Status
from dicom_listener.dicom.dimse import encode_command, parse_command
from dicom_listener.dicom.file_meta import file_meta_bytes
from dicom_listener.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    P_DATA_TF,
    PDU_HEADER,
    ProtocolError,
)
from dicom_listener.dicom.statuses import SUCCESS
from dicom_listener.dicom.uids import VERIFICATION
from dicom_listener.dicom.values import decode_uid
from dicom_listener.fuzz.seeds import AE_TITLE, associate_rq
from dicom_listener.handlers import Admission, StoreContext, handle_store
from dicom_listener.metrics import ListenerMetrics
from dicom_listener.security import AssociationPolicy
from scanwatch.dicom_scan import Truncated, Undecodable, scan_part10
from scanwatch.store_layout import is_uid, parse_file_name

#: Every status the C-STORE handler documents (``dicom/statuses.py``).
DOCUMENTED_STATUSES = frozenset(
    value for name, value in vars(statuses).items() if name.isupper() and isinstance(value, int)
)
#: The tags the handler's scan asks for (``handlers._SCANNED``).
SCANNED_TAGS = frozenset({0x0020000D, 0x0020000E, 0x00080018, 0x00080016, 0x00080060})
_UNDEFINED = 0xFFFFFFFF
#: StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID: the layout's path components.
_PATH_TAGS = (0x0020000D, 0x0020000E, 0x00080018)


class Finding(AssertionError):
    """The code under test answered an input in a way its documentation does not allow."""


@dataclass
class WireSocket:
    """The part of a socket an :class:`Association` uses, over the bytes a peer sent; what the
    association sends back is kept in ``sent``. When the input runs out, ``recv_into``
    returns 0, as a socket does when the peer closed the connection."""

    data: bytes
    offset: int = 0
    sent: bytearray = field(default_factory=bytearray)

    def settimeout(self, value: float | None) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        view = memoryview(buffer)
        n = min(nbytes or len(view), len(self.data) - self.offset)
        view[:n] = self.data[self.offset : self.offset + n]
        self.offset += n
        return n

    def sendall(self, data: bytes) -> None:
        self.sent += data


@cache
def _workdir() -> Path:
    """A folder for the targets' files, on tmpfs when there is one (created on first use)."""
    base = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    # libFuzzer ends its process with C exit(), which skips atexit: a run's folder is removed
    # by the next one, once the process that made it is gone.
    for old in base.glob("scanwatch-fuzz-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"scanwatch-fuzz-{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def _server_config() -> ServerConfig:
    incoming = _workdir() / "association-incoming"
    incoming.mkdir()
    return ServerConfig(
        contexts={
            VERIFICATION: frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian}),
            MRImageStorage: frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian}),
        },
        incoming_dir=incoming,
        max_pdu_size=16_384,
    )


@cache
def _policy() -> AssociationPolicy:
    return AssociationPolicy(AE_TITLE, [], ListenerMetrics())


def _check_received(received: ReceivedInstance, problems: list[str]) -> Status:
    """The association's store function: the file must be a Part 10 file whose File Meta
    pydicom reads, saying the negotiated transfer syntax."""
    try:
        meta = read_file_meta_info(received.path)
        if meta.TransferSyntaxUID != received.transfer_syntax:
            problems.append("file meta names another transfer syntax")
        if not all(
            is_uid(str(meta.get(k, "")))
            for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
        ):
            problems.append("file meta names a value that is not a UID")
        if received.size_bytes != received.path.stat().st_size:
            problems.append("size_bytes is not the file's size")
    except Exception as exc:  # noqa: BLE001 - recorded: the store function must not raise
        problems.append(f"file meta unreadable: {exc!r}")
    received.path.unlink()
    return Status(SUCCESS)


def _check_answers(sent: bytes) -> list[int]:
    """The PDU types the association sent, each checked to be well formed."""
    kinds, offset, command = [], 0, bytearray()
    while offset < len(sent):
        if offset + 6 > len(sent):
            raise Finding("a truncated PDU header was sent")
        kind, length = PDU_HEADER.unpack_from(sent, offset)
        body = sent[offset + 6 : offset + 6 + length]
        if len(body) != length:
            raise Finding("a PDU shorter than its length was sent")
        if kind == A_ASSOCIATE_AC:
            PynetdicomAssociateAC().decode(sent[offset : offset + 6 + length])
        elif kind == P_DATA_TF:
            inner = 0
            while inner < len(body):
                size, _, control = struct.unpack_from(">LBB", body, inner)
                command += body[inner + 6 : inner + 4 + size]
                inner += 4 + size
                if control & 0x02:
                    ds = read_dataset(io.BytesIO(bytes(command)), True, True)
                    if int(ds.Status) not in DOCUMENTED_STATUSES:
                        raise Finding(f"undocumented status 0x{int(ds.Status):04X}")
                    for tag in (0x00000002, 0x00001000):  # Affected SOP Class / Instance UID
                        if tag in ds and not is_uid(decode_uid(ds.get_item(tag).value)):
                            raise Finding(
                                f"a response echoes ({tag >> 16:04X},{tag & 0xFFFF:04X}), no UID"
                            )
                    command.clear()
        elif kind not in (A_ASSOCIATE_RJ, A_RELEASE_RP, A_ABORT):
            raise Finding(f"PDU type {kind} was sent")
        kinds.append(kind)
        offset += 6 + length
    return kinds


def association(data: bytes) -> None:
    """Serve ``data`` as one peer's connection (see the module docstring)."""
    config = _server_config()
    slots = threading.BoundedSemaphore(1)
    problems: list[str] = []
    sock = WireSocket(data)
    assoc = Association(
        sock,  # type: ignore[arg-type]  # duck-typed: the four calls an Association makes
        "127.0.0.1",
        config,
        _policy().check,
        lambda received: _check_received(received, problems),
        slots,
        lambda reason: None,
    )
    ended_by_protocol_error = False
    try:
        assoc.serve()
    except ProtocolError:
        ended_by_protocol_error = True
    except ConnectionError:
        pass  # the input ran out: the peer closed the connection
    kinds = _check_answers(bytes(sock.sent))
    if ended_by_protocol_error and (not kinds or kinds[-1] != A_ABORT):
        raise Finding("a protocol error ended the association without an A-ABORT")
    if not slots.acquire(blocking=False):
        raise Finding("the association slot was not released")
    left = list(config.incoming_dir.iterdir())
    if left:
        for path in left:
            path.unlink()
        raise Finding(f"{len(left)} temporary file(s) left behind")
    if problems:
        raise Finding("; ".join(problems))


def pdata(data: bytes) -> None:
    """``data`` after a valid A-ASSOCIATE-RQ (see :func:`association`)."""
    association(associate_rq() + data)


def command(data: bytes) -> None:
    """A Command Set: parsed, or refused with ProtocolError; what is parsed round-trips."""
    try:
        elements = parse_command(data)
    except ProtocolError:
        return
    again = parse_command(encode_command(elements))
    again.pop(0x00000000, None)
    elements.pop(0x00000000, None)
    if again != elements:
        raise Finding("a parsed Command Set does not encode back to itself")


def file_meta(data: bytes) -> None:
    """File meta of three NUL-separated values, as the association decodes UIDs."""
    parts = [*data.split(b"\x00", 2), b"", b""][:3]
    sop_class, sop_instance, syntax = (decode_uid(part) for part in parts)
    valid = all(is_uid(value) for value in (sop_class, sop_instance, syntax))
    try:
        header = file_meta_bytes(sop_class, sop_instance, syntax)
    except ValueError:
        if valid:
            raise Finding("file meta refused three valid UIDs") from None
        return
    if not valid:
        raise Finding("file meta written with a value that is not a UID")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = pydicom.dcmread(io.BytesIO(header)).file_meta
    read_back = [
        decode_uid(meta[tag].value.encode() if isinstance(meta[tag].value, str) else b"")
        for tag in (0x00020002, 0x00020003, 0x00020010)
    ]
    if read_back != [sop_class, sop_instance, syntax]:
        raise Finding(f"file meta reads back as {read_back!r}")


def _fragments_fit(value: bytes) -> bool:
    """Whether encapsulated pixel data (before its delimiter) is whole items, end to end."""
    offset = 0
    while offset < len(value):
        if offset + 8 > len(value) or value[offset : offset + 4] != b"\xfe\xff\x00\xe0":
            return False
        offset += 8 + int.from_bytes(value[offset + 4 : offset + 8], "little")
    return offset == len(value)


def _pydicom_values(data: bytes, explicit: bool) -> dict[int, bytes] | None:
    """The raw top-level values pydicom reads for :data:`SCANNED_TAGS`, when pydicom reads the
    whole file as this transfer syntax with every element inside the bytes; else None."""
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
            syntax = ds.file_meta.TransferSyntaxUID
            if any("VR for reading" in str(w.message) for w in warned):
                return None  # pydicom read another encoding than the scan was asked to
            if not syntax.is_little_endian or syntax.is_deflated:
                return None
            if syntax.is_implicit_VR == explicit:
                return None
            raw = list(ds._dict.values())
    except Exception:  # noqa: BLE001 - pydicom refused the file: no oracle for it
        return None
    values, end = {}, 0
    for elem in raw:
        if not isinstance(elem, RawDataElement) or elem.value_tell is None:
            return None  # a sequence pydicom parsed on reading: not compared
        value = bytes(elem.value or b"")
        if elem.length == _UNDEFINED and not _fragments_fit(value):
            return None  # pydicom looks for the delimiter only; the scan walks the items
        # An undefined length (encapsulated pixel data) ends after its sequence delimiter.
        length = len(value) + 8 if elem.length == _UNDEFINED else elem.length
        end = max(end, elem.value_tell + length)
        if elem.tag in SCANNED_TAGS:
            values[int(elem.tag)] = value
    # pydicom stops without a word at a partial element header, and reads a value cut short;
    # the scan calls both truncated (rightly): compare only files pydicom read to the end.
    return values if end == len(data) else None


def scan(data: bytes) -> None:
    """scan_part10 over a mutated Part 10 file, checked against pydicom."""
    explicit = not (data[:1] and data[0] & 1)
    try:
        values = scan_part10(bytes(data), explicit, SCANNED_TAGS)
        outcome: type[Exception] | None = None
    except (Truncated, Undecodable) as exc:
        values, outcome = {}, type(exc)
    if outcome is Undecodable:
        return  # the listener reads such a file with pydicom instead
    expected = _pydicom_values(bytes(data), explicit)
    if expected is None:
        return
    if outcome is Truncated:
        raise Finding("pydicom reads every element within the bytes; the scan says truncated")
    if values != expected:
        raise Finding(f"scan {values!r} != pydicom {expected!r}")


@dataclass
class _StoreBench:
    root: Path
    ctx: StoreContext
    writes: list[str] = field(default_factory=list)
    active: bool = False


def _audit(bench: _StoreBench) -> Callable[[str, tuple[object, ...]], None]:
    """An audit hook that records every path opened for writing, created or renamed to."""

    def hook(event: str, args: tuple[object, ...]) -> None:
        if not bench.active:
            return
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing and isinstance(path, str | bytes | os.PathLike):
                bench.writes.append(os.fsdecode(path))
        elif event in ("os.mkdir", "os.rename", "os.link", "os.symlink"):
            targets = args[1:2] if event != "os.mkdir" else args[:1]
            bench.writes += [os.fsdecode(p) for p in targets if isinstance(p, str | bytes)]
        elif event == "sqlite3.connect" and args:
            bench.writes.append(os.fsdecode(args[0]))  # type: ignore[arg-type]

    return hook


@cache
def _store_bench() -> _StoreBench:
    root = (_workdir() / "store").resolve()
    outbox = Outbox(root / ".scanwatch" / "outbox.sqlite3")
    outbox.open()
    ctx = StoreContext(
        store=FileStore(root),
        outbox=outbox,
        metrics=ListenerMetrics(),
        quarantine=Quarantine(root / ".quarantine"),
        admission=Admission(root, 0, outbox, max_events=1 << 62),
    )
    (root / ".incoming").mkdir(parents=True, exist_ok=True)
    bench = _StoreBench(root, ctx)
    sys.addaudithook(_audit(bench))
    return bench


def _affected(whole: bytes, explicit: bool) -> str:
    """The dataset's own SOPInstanceUID as the scan reads it (the sender repeats it in the
    request), or a placeholder."""
    try:
        raw = scan_part10(whole, explicit, frozenset({0x00080018})).get(0x00080018, b"")
    except (Truncated, Undecodable):
        return "1.2.3"
    return decode_uid(raw).strip()


def store(data: bytes) -> None:
    """The C-STORE handler over one received dataset (see the module docstring)."""
    if not data:
        return
    bench = _store_bench()
    root, ctx = bench.root, bench.ctx
    explicit = not data[0] & 1
    syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    header = file_meta_bytes(MRImageStorage, "1.2.3", syntax)
    whole = header + data[1:]
    path = root / ".incoming" / "fuzz.tmp"
    path.write_bytes(whole)
    received = ReceivedInstance(
        path=path,
        sha256=hashlib.sha256(whole).hexdigest(),
        size_bytes=len(whole),
        sop_class_uid=MRImageStorage,
        transfer_syntax=syntax,
        affected_sop_instance_uid=_affected(whole, explicit),
        calling_ae_title="FUZZ",
        called_ae_title=AE_TITLE,
        data=whole,
    )
    depth = ctx.outbox.depth()
    bench.writes.clear()
    bench.active = True
    try:
        answer = handle_store(received, ctx)
    finally:
        bench.active = False
    try:
        _check_store(bench, answer, depth)
    finally:
        path.unlink(missing_ok=True)
        for child in root.iterdir():  # keep the tmpfs small: instances and quarantine go
            if child.name not in (".scanwatch", ".incoming"):
                shutil.rmtree(child)


def _check_store(bench: _StoreBench, answer: Status, depth: int) -> None:
    root, ctx = bench.root, bench.ctx
    outside = [p for p in bench.writes if not Path(p).resolve().is_relative_to(root)]
    if outside:
        raise Finding(f"written outside the store root: {outside!r}")
    if answer.Status not in DOCUMENTED_STATUSES:
        raise Finding(f"undocumented status 0x{answer.Status:04X}")
    if answer.Status != SUCCESS:
        if ctx.outbox.depth() != depth:
            raise Finding("a refused instance recorded an event")
        return
    stored = [
        p.relative_to(root)
        for p in root.rglob("*.dcm")
        if not p.relative_to(root).parts[0].startswith(".")
    ]
    for rel in stored:
        if len(rel.parts) != 3 or not all(is_uid(part) for part in rel.parts[:2]):
            raise Finding(f"stored at {rel!s}: not <Study>/<Series>/<SOP>.dcm")
        parsed = parse_file_name(rel.parts[2])
        if parsed is None:
            raise Finding(f"stored as {rel.parts[2]!r}: not a layout file name")
        # The path names the dataset's own UIDs (only their NUL or space padding removed).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
        own = [decode_uid(ds.get_item(tag).value or b"") for tag in _PATH_TAGS]
        if own != [rel.parts[0], rel.parts[1], parsed[0]]:
            raise Finding(f"stored at {rel!s}, the dataset says {own!r}")


#: Target name → target.
TARGETS: dict[str, Callable[[bytes], None]] = {
    "association": association,
    "pdata": pdata,
    "command": command,
    "file_meta": file_meta,
    "scan": scan,
    "store": store,
}


def quiet() -> None:
    """Silence the listener's logs (one line per refused input would drown the fuzzer's)."""
    logging.disable(logging.CRITICAL)
