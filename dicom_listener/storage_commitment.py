"""The Storage Commitment SCP, push model (PS3.4 J.3): a plain function of the N-ACTION request.

A sender asks (N-ACTION, Action Type 1) whether the instances it lists are safely stored, so
that it may delete its own copies. The listener commits an instance only when its file and its
event were committed together by the C-STORE handler (the outbox's ``instances`` table: the
same transaction that preceded the C-STORE's success) and the file is still in the store; every
other instance is reported failed, with its reason (PS3.4 J.3.3.1: 0x0112 no such object
instance; 0x0110 processing failure when the record is there but the file is not). The result
goes back in an N-EVENT-REPORT (Event Type 1: all committed, 2: some failed) on the same
association, right after the N-ACTION-RSP; if the sender released or aborted before answering
it, on a new association to the sender's address (``commitment_peers``), by
:class:`~dicom_listener.adapters.commitment.CommitmentReporter`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_listener.adapters.filestore import InstanceStore
from dicom_listener.adapters.outbox import Outbox
from dicom_listener.dicom.contract import (
    EventReport,
    NormalizedRequest,
    NormalizedResponse,
    Status,
)
from dicom_listener.dicom.statuses import (
    MISSING_ATTRIBUTE,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)
from dicom_listener.metrics import ListenerMetrics
from scanwatch.store_layout import is_uid

log = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known instance (PS3.4 J.3.5).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2.1).
REQUEST_COMMITMENT = 1
#: Event Type IDs of the result (PS3.4 J.3.3.1).
ALL_COMMITTED, SOME_FAILED = 1, 2
#: Failure Reasons (PS3.4 J.3.3.1.1): no record of it; the record but not the file.
NO_SUCH_OBJECT_INSTANCE = 0x0112
FAILURE_PROCESSING = 0x0110

#: Sends an event report on a new association: (the sender's AE title, event type, dataset).
DeliverFn = Callable[[str, int, Dataset], None]


@dataclass(frozen=True)
class CommitmentContext:
    """What the Storage Commitment handler needs, handed over by the app factory."""

    outbox: Outbox
    store: InstanceStore
    metrics: ListenerMetrics
    deliver: DeliverFn


def _refuse(code: int, comment: str) -> NormalizedResponse:
    return NormalizedResponse(Status(code, comment), STORAGE_COMMITMENT_INSTANCE)


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` as a DIMSE dataset in ``transfer_syntax`` (little endian, implicit or explicit)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def _references(request: NormalizedRequest) -> tuple[str, list[tuple[str, str]]] | None:
    """The request's Transaction UID and (SOP Class, SOP Instance) pairs; None if unreadable."""
    try:
        ds = read_dataset(
            io.BytesIO(request.dataset),
            is_implicit_VR=request.transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=request.transfer_syntax != ExplicitVRBigEndian,
        )
        transaction = str(ds.get("TransactionUID", "") or "").strip()
        pairs = [
            (
                str(item.get("ReferencedSOPClassUID", "") or "").strip(),
                str(item.get("ReferencedSOPInstanceUID", "") or "").strip(),
            )
            for item in ds.get("ReferencedSOPSequence", [])
        ]
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        return None
    return transaction, pairs


def commitment_result(
    transaction: str, pairs: list[tuple[str, str]], outbox: Outbox, store: InstanceStore
) -> tuple[int, Dataset]:
    """The event type and dataset reporting which of ``pairs`` are committed, and why each
    other one failed."""
    stored = outbox.stored([uid for _, uid in pairs if is_uid(uid)])
    committed, failed = [], []
    for sop_class, sop_uid in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        uri = stored.get(sop_uid)
        if uri is not None and store.holds(uri):
            committed.append(item)
            continue
        item.FailureReason = NO_SUCH_OBJECT_INSTANCE if uri is None else FAILURE_PROCESSING
        failed.append(item)
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.RetrieveAETitle = ""
    if committed:
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), ds


def handle_commitment(request: NormalizedRequest, ctx: CommitmentContext) -> NormalizedResponse:
    """Answer a Storage Commitment request, and attach the result to send after the answer."""
    if request.sop_class_uid != STORAGE_COMMITMENT:
        return _refuse(SOP_CLASS_NOT_SUPPORTED, "only Storage Commitment takes an N-ACTION")
    if request.sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
        return _refuse(NO_SUCH_SOP_INSTANCE, "not the Storage Commitment well-known instance")
    if request.action_type != REQUEST_COMMITMENT:
        return _refuse(NO_SUCH_ACTION, f"no action type {request.action_type}")
    parsed = _references(request) if request.dataset else None
    if parsed is None:
        return _refuse(PROCESSING_FAILURE, "action information could not be decoded")
    transaction, pairs = parsed
    if not is_uid(transaction) or not pairs:
        return _refuse(MISSING_ATTRIBUTE, "TransactionUID and ReferencedSOPSequence needed")
    event_type, result = commitment_result(transaction, pairs, ctx.outbox, ctx.store)
    failed = len(result.get("FailedSOPSequence", []))
    ctx.metrics.commitment_instances.labels("committed").inc(len(pairs) - failed)
    ctx.metrics.commitment_instances.labels("failed").inc(failed)
    log.info(
        "storage commitment answered",
        extra={
            "transaction_uid": transaction,
            "committed": len(pairs) - failed,
            "failed": failed,
            "calling_ae_title": request.calling_ae_title,
        },
    )
    sender = request.calling_ae_title

    def undelivered() -> None:
        ctx.deliver(sender, event_type, result)

    report = EventReport(
        STORAGE_COMMITMENT,
        STORAGE_COMMITMENT_INSTANCE,
        event_type,
        encode(result, request.transfer_syntax),
        undelivered,
    )
    return NormalizedResponse(Status(SUCCESS), STORAGE_COMMITMENT_INSTANCE, report)
