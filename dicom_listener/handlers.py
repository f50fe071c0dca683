"""The C-STORE handler: a plain function of a received instance (STYLE habit 1).

The network side (:mod:`dicom_listener.dicom`) streams each dataset exactly as received
to a temporary Part 10 file. The handler admits the request (free disk, outbox room), reads
the identifying UIDs, seals and fsyncs the file, places it in the store, and records the instance
and its ``dicom.instance.received.v1`` event in the durable outbox in one transaction; only then
does it answer success (PS3.4 Annex B). :func:`record_unrecorded` records, at start-up, sealed
files whose transaction a power cut took. Kafka is reached by the outbox relay, not here, so a
broker outage never fails a C-STORE. Any failure becomes a failure status with an Error Comment; no
exception escapes to the association.

Duplicates: the same SOPInstanceUID with the same bytes is answered success and produces no
event; with other bytes it is stored as a new version (``<SOP>.v<N>.dcm``) and its event
carries Kafka headers ``scanwatch-instance-version`` and ``scanwatch-supersedes-sha256``.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydantic import TypeAdapter, ValidationError
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_listener.adapters.filestore import (
    FileStore,
    InstanceStore,
    Quarantine,
    Seal,
    StagedInstance,
    read_chunks,
)
from dicom_listener.adapters.outbox import Arrival, Outbox, OutboxTransaction
from dicom_listener.dicom.contract import ReceivedInstance, Status
from dicom_listener.dicom.statuses import (
    CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_MISSING_UID,
    CANNOT_UNDERSTAND_TRUNCATED,
    CANNOT_UNDERSTAND_UNDECODABLE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES_DISK_LOW,
    OUT_OF_RESOURCES_OUTBOX_FULL,
    OUT_OF_RESOURCES_OUTBOX_WRITE,
    OUT_OF_RESOURCES_STORAGE,
    SUCCESS,
)
from dicom_listener.dicom.values import decode_uid
from dicom_listener.metrics import ListenerMetrics
from scanwatch.dicom_scan import Truncated, Undecodable, scan_part10
from schemas.events import UID, InstanceReceivedV1

log = logging.getLogger(__name__)

#: Kafka header carrying the version (2, 3 ...) of an instance re-sent with other bytes.
HEADER_INSTANCE_VERSION = "scanwatch-instance-version"
#: Kafka header carrying the SHA-256 of the version a new version supersedes.
HEADER_SUPERSEDES_SHA256 = "scanwatch-supersedes-sha256"

#: Attributes every stored instance must carry (type 1 in every composite IOD).
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Error Comment (0000,0902) is LO: at most 64 characters.
_ERROR_COMMENT_MAX = 64
#: Element values larger than this are not read while identifying an instance (pixel data
#: stays on disk: memory use does not grow with the instance).
_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF

_uid_adapter: TypeAdapter[str] = TypeAdapter(UID)
#: Transfer syntaxes read with pydicom; the others with the fast scan (:mod:`scanwatch.dicom_scan`).
_PYDICOM_SYNTAXES = frozenset({ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})
#: Kafka header → keyword of the counts an instance's event carries (IS values, when the
#: instance has them): from them the worker can tell a series complete without waiting
#: (``inference_worker.assembly.header_complete``), for senders known to fill them correctly.
COUNT_HEADERS = {
    "scanwatch-images-in-acquisition": "ImagesInAcquisition",
    "scanwatch-acquisition-number": "AcquisitionNumber",
    "scanwatch-number-of-frames": "NumberOfFrames",
}
_COUNTS = {
    "ImagesInAcquisition": 0x00201002,
    "AcquisitionNumber": 0x00200012,
    "NumberOfFrames": 0x00280008,
}
#: Keyword → tag of the values the fast scan keeps.
_SCANNED = {
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SOPInstanceUID": 0x00080018,
    "SOPClassUID": 0x00080016,
    "Modality": 0x00080060,
    **_COUNTS,
}
_SCANNED_TAGS = frozenset(_SCANNED.values())


class Admission:
    """Back-pressure: refuses C-STOREs while the disk is low or the outbox is too deep.

    Checked again at most every ``check_interval_s`` (a statvfs and a query cost as much as a
    tenth of a C-STORE), so the listener recovers on its own within that interval when space
    returns or the publisher catches up.
    """

    def __init__(
        self,
        storage_dir: Path,
        min_free_bytes: int,
        outbox: Outbox,
        max_events: int,
        check_interval_s: float = 0.1,
    ):
        self.storage_dir = Path(storage_dir)
        self.min_free_bytes = min_free_bytes
        self.outbox = outbox
        self.max_events = max_events
        self.check_interval_s = check_interval_s
        self._verdict: _Refused | None = None
        self._next_check = 0.0

    def free_bytes(self) -> int:
        folder = self.storage_dir.resolve()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return shutil.disk_usage(folder).free

    def refusal(self) -> _Refused | None:
        """Why a C-STORE must be refused now, or None."""
        now = time.monotonic()
        if now >= self._next_check:
            self._verdict = self._check()
            self._next_check = now + self.check_interval_s
        return self._verdict

    def _check(self) -> _Refused | None:
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            return _Refused(
                OUT_OF_RESOURCES_DISK_LOW, "disk_low", "storage below free-space watermark"
            )
        if self.outbox.depth() >= self.max_events:
            return _Refused(
                OUT_OF_RESOURCES_OUTBOX_FULL, "outbox_full", "event outbox full; Kafka behind"
            )
        return None


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, handed over by the app factory."""

    store: InstanceStore
    outbox: Outbox
    metrics: ListenerMetrics
    quarantine: Quarantine
    admission: Admission


class _Identity(NamedTuple):
    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    Modality: str | None
    counts: list[tuple[str, bytes]]  # COUNT_HEADERS the instance has values for


class _Refused(Exception):
    def __init__(self, status: int, reason: str, comment: str, quarantine: bool = False) -> None:
        super().__init__(comment)
        self.status, self.reason, self.comment = status, reason, comment
        self.quarantine = quarantine


def status(code: int, comment: str | None = None) -> Status:
    """A C-STORE response status, with an Error Comment (LO: 64 characters) when given."""
    return Status(code, comment[:_ERROR_COMMENT_MAX] if comment else None)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _uid_text(value: object) -> str:
    """A UI value without its padding (trailing NUL or space, PS3.5 6.2) and nothing else
    removed: a UID with a newline or a leading space is refused, not silently repaired into
    another UID than the dataset's."""
    return "" if value is None else str(value).rstrip("\x00 ")


def _bad(status_code: int, reason: str, comment: str) -> _Refused:
    return _Refused(status_code, reason, comment, quarantine=True)


def _check_complete(ds: Dataset, size: int) -> None:
    """Raise when an element's declared length runs past the end of the received bytes."""
    for elem in ds._dict.values():  # raw elements: value_tell and length as read
        if (
            isinstance(elem, RawDataElement)
            and elem.length != _UNDEFINED_LENGTH
            and elem.value_tell is not None
            and elem.value_tell + elem.length > size
        ):
            raise _bad(CANNOT_UNDERSTAND_TRUNCATED, "truncated", "dataset is truncated")


def _read_with_pydicom(path: Path, transfer_syntax: str) -> dict[str, str]:
    """Big endian and deflate: pydicom reads the identifying values."""
    with open(path, "rb") as fp:
        size = fp.seek(0, io.SEEK_END)
        fp.seek(0)
        ds = pydicom.dcmread(fp, defer_size=_DEFER_BYTES)
        if transfer_syntax != DeflatedExplicitVRLittleEndian:
            _check_complete(ds, size)
        values = {keyword: _uid_text(ds.get(keyword)) for keyword in REQUIRED_UIDS}
        counts = {keyword: _text(ds.get(keyword)) for keyword in _COUNTS}
        return values | counts | {"Modality": _text(ds.get("Modality"))}


def _read_values(received: ReceivedInstance) -> dict[str, str]:
    """The identifying values of the received file; raises :class:`_Refused` when it is
    truncated or cannot be decoded. The fast scan reads little-endian files; pydicom reads
    big endian, deflate, and whatever the scan finds odd (pydicom is more forgiving)."""
    try:
        if received.transfer_syntax not in _PYDICOM_SYNTAXES:
            try:
                raw = scan_part10(
                    received.path if received.data is None else received.data,
                    received.transfer_syntax != ImplicitVRLittleEndian,
                    _SCANNED_TAGS,
                )
            except Undecodable:
                pass
            else:
                values = {
                    keyword: decode_uid(raw.get(tag, b"")) for keyword, tag in _SCANNED.items()
                }
                return values | {"Modality": values["Modality"].strip()}
        return _read_with_pydicom(received.path, received.transfer_syntax)
    except _Refused:
        raise
    except Truncated:
        raise _bad(CANNOT_UNDERSTAND_TRUNCATED, "truncated", "dataset is truncated") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad input
        raise _bad(
            CANNOT_UNDERSTAND_UNDECODABLE, "undecodable", "dataset could not be decoded"
        ) from exc


def _identify(received: ReceivedInstance) -> _Identity:
    """Read the UIDs the store and the event need, and check them against the request."""
    values = _read_values(received)
    modality = values.pop("Modality")
    counts = [
        (header, value.encode())
        for header, keyword in COUNT_HEADERS.items()
        if (value := values.pop(keyword, "").strip()).isdigit() and len(value) <= 12
    ]
    for keyword, value in values.items():
        if not value:
            raise _bad(CANNOT_UNDERSTAND_MISSING_UID, "missing_uid", f"{keyword} missing")
        try:
            _uid_adapter.validate_python(value)
        except ValidationError:
            raise _bad(
                CANNOT_UNDERSTAND_INVALID_UID, "invalid_uid", f"{keyword} is not a valid UID"
            ) from None
    if values["SOPClassUID"] != received.sop_class_uid:
        raise _bad(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "sop_class_mismatch",
            "SOPClassUID differs from the negotiated SOP Class",
        )
    if values["SOPInstanceUID"] != received.affected_sop_instance_uid:
        raise _bad(
            CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
            "sop_instance_mismatch",
            "SOPInstanceUID differs from AffectedSOPInstanceUID",
        )
    # Modality is CS (at most 16 characters); a malformed one is dropped, not fatal.
    modality_or_none = modality if 0 < len(modality) <= 16 else None
    return _Identity(**values, Modality=modality_or_none, counts=counts)


def _refuse(received: ReceivedInstance, ctx: StoreContext, refused: _Refused) -> Status:
    ctx.metrics.refused.labels(refused.reason).inc()
    extra: dict[str, object] = {
        "AffectedSOPInstanceUID": received.affected_sop_instance_uid,
        "reason": refused.reason,
        "status": f"0x{refused.status:04X}",
        "calling_ae_title": received.calling_ae_title,
    }
    if refused.quarantine:
        try:
            with open(received.path, "rb") as fp:
                extra["quarantined_as"] = ctx.quarantine.keep(refused.reason, read_chunks(fp)).name
            ctx.metrics.quarantined.inc()
        except OSError as exc:
            extra["quarantine_error"] = repr(exc)
    log.warning("C-STORE refused: %s", refused.comment, extra=extra)
    return status(refused.status, refused.comment)


def _storage_failed(exc: BaseException, uids: dict[str, str], ctx: StoreContext) -> Status:
    ctx.metrics.refused.labels("storage_failed").inc()
    log.error("C-STORE failed: instance not stored: %r", exc, extra=uids)
    return status(OUT_OF_RESOURCES_STORAGE, "instance could not be stored")


def handle_store(received: ReceivedInstance, ctx: StoreContext) -> Status:
    """Admit, store durably, record the event, and only then answer success.

    On success ``received.path`` has been moved into the store (or removed: a duplicate);
    after any other answer the caller removes it.
    """
    if received.write_error is not None:
        uids = {"AffectedSOPInstanceUID": received.affected_sop_instance_uid}
        return _storage_failed(received.write_error, uids, ctx)
    refusal = ctx.admission.refusal()
    if refusal is not None:
        return _refuse(received, ctx, refusal)
    arrival = ctx.outbox.announce()
    try:
        return _store(received, ctx, arrival)
    finally:
        arrival.withdraw()


def _event(
    received: ReceivedInstance, ident: _Identity, staged: StagedInstance, storage_uri: str
) -> InstanceReceivedV1:
    return InstanceReceivedV1(
        StudyInstanceUID=ident.StudyInstanceUID,
        SeriesInstanceUID=ident.SeriesInstanceUID,
        SOPInstanceUID=ident.SOPInstanceUID,
        SOPClassUID=ident.SOPClassUID,
        TransferSyntaxUID=received.transfer_syntax,
        Modality=ident.Modality,
        storage_uri=storage_uri,
        size_bytes=staged.size_bytes,
        sha256=staged.sha256,
        calling_ae_title=received.calling_ae_title,
        called_ae_title=received.called_ae_title,
    )


def _store(received: ReceivedInstance, ctx: StoreContext, arrival: Arrival) -> Status:
    """Identify, fsync and place the file, then commit its event with ``arrival``."""
    started = time.perf_counter()
    try:
        ident = _identify(received)
    except _Refused as refused:
        return _refuse(received, ctx, refused)
    uids = {
        "StudyInstanceUID": ident.StudyInstanceUID,
        "SeriesInstanceUID": ident.SeriesInstanceUID,
        "SOPInstanceUID": ident.SOPInstanceUID,
    }
    try:
        staged = ctx.store.adopt(
            received.path,
            ident.StudyInstanceUID,
            ident.SeriesInstanceUID,
            ident.SOPInstanceUID,
            received.sha256,
            received.size_bytes,
            fd=received.fd,
            seal=Seal(received.sha256, received.calling_ae_title, received.called_ae_title),
        )
        # Built before the group commit, which runs one request at a time: only a new version
        # (another storage_uri) changes it there.
        event = _event(received, ident, staged, ctx.store.uri_for(staged, 1))
    except Exception as exc:  # noqa: BLE001 - any failure to store is a refusal
        return _storage_failed(exc, uids, ctx)

    first_version = event.to_bytes()
    key = ident.StudyInstanceUID.encode()

    def record(tx: OutboxTransaction) -> str:
        """Inside the (group) transaction: duplicate, new version or new instance."""
        known = tx.known(ident.SOPInstanceUID)
        if known is not None and known.sha256 == staged.sha256:
            tx.rebuildable()  # nothing recorded
            return "duplicate"
        version = known.version + 1 if known else 1
        committed = ctx.store.commit(staged, version, fsync_folder=False)
        # A file renamed into place whose event is not committed was never acknowledged:
        # remove it so that nothing is half-stored (the sender retries).
        tx.on_rollback(lambda: committed.path.unlink(missing_ok=True))
        if staged.name_durable:  # recorded instead: its folder is fsync'd later, in a batch
            tx.place_later(staged.tmp, committed.path)
        else:
            tx.fsync_folder_before_commit(staged.folder)
        if staged.sealed:  # a power cut that takes this commit leaves the file to rebuild it
            tx.rebuildable()
        value, headers = first_version, list(ident.counts)
        if known is not None:
            value = event.model_copy(update={"storage_uri": committed.uri}).to_bytes()
            headers += [
                (HEADER_INSTANCE_VERSION, str(version).encode()),
                (HEADER_SUPERSEDES_SHA256, known.sha256.encode()),
            ]
        tx.record(
            ident.SOPInstanceUID,
            committed.sha256,
            version,
            committed.uri,
            topic=event.SCHEMA,
            key=key,
            value=value,
            headers=headers,
        )
        return "new_version" if known is not None else "stored"

    try:
        outcome = ctx.outbox.submit(record, arrival)
    except Exception as exc:  # noqa: BLE001 - not recorded means not successful
        ctx.store.discard(staged)
        ctx.metrics.refused.labels("outbox_failed").inc()
        log.error("C-STORE failed: event not recorded: %r", exc, extra=uids)
        return status(OUT_OF_RESOURCES_OUTBOX_WRITE, "event could not be recorded")
    finally:
        ctx.metrics.store_seconds.observe(time.perf_counter() - started)

    if outcome == "duplicate":
        ctx.store.discard(staged)
        ctx.metrics.duplicates.inc()
    elif outcome == "new_version":
        ctx.metrics.new_versions.inc()
    ctx.metrics.received.inc()
    ctx.metrics.received_bytes.inc(staged.size_bytes)
    if log.isEnabledFor(logging.DEBUG):  # the hot path: no record built for a line not kept
        log.debug(
            "instance received",
            extra=uids
            | {
                "outcome": outcome,
                "size_bytes": staged.size_bytes,
                "calling_ae_title": received.calling_ae_title,
            },
        )
    return status(SUCCESS)


def record_unrecorded(store: FileStore, ctx: StoreContext) -> int:
    """Record the sealed files a power cut left without their outbox transaction
    (:meth:`FileStore.unrecorded`); return how many were recorded (or found duplicates).

    At start-up, before associations are served and before the sweep. Admission is not asked:
    these instances were accepted already. Each goes through the C-STORE path under a second
    name, so that its own name keeps the bytes until the new record is flushed. One that cannot
    be recorded now (the outbox or the disk failing) is moved to the quarantine folder, never
    swept, and logged."""
    recorded: list[Path] = []
    for path, seal in store.unrecorded():
        second = store.second_name(path)
        try:
            meta = pydicom.filereader.read_file_meta_info(second)
            received = ReceivedInstance(
                path=second,
                sha256=seal.sha256,
                size_bytes=second.stat().st_size,
                sop_class_uid=_uid_text(meta.get("MediaStorageSOPClassUID")),
                transfer_syntax=_uid_text(meta.get("TransferSyntaxUID")),
                affected_sop_instance_uid=_uid_text(meta.get("MediaStorageSOPInstanceUID")),
                calling_ae_title=seal.calling_ae_title,
                called_ae_title=seal.called_ae_title,
            )
            arrival = ctx.outbox.announce()
            try:
                answer = _store(received, ctx, arrival)
            finally:
                arrival.withdraw()
        except Exception as exc:  # noqa: BLE001 - kept, and said, below
            answer = status(OUT_OF_RESOURCES_STORAGE, repr(exc))
        if answer.Status == SUCCESS:
            recorded.append(path)
            continue
        second.unlink(missing_ok=True)
        with open(path, "rb") as fp:
            kept = ctx.quarantine.keep("unrecorded", read_chunks(fp))
        path.unlink()
        log.error(
            "accepted instance not recorded at start-up; kept for an operator",
            extra={"quarantined_as": kept.name, "status": f"0x{answer.Status:04X}"},
        )
    if recorded:
        ctx.outbox.settle_placements()  # the new records flushed, their links durable
        for path in recorded:
            path.unlink()
        log.warning("instances recorded again after a lost commit", extra={"count": len(recorded)})
    return len(recorded)
