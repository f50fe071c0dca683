"""DIMSE handlers: plain functions of a pynetdicom ``event`` (STYLE habit 1).

The C-STORE handler reads the identifying UIDs, stores the instance exactly as received,
publishes ``dicom.instance.received.v1`` and only then answers success (PS3.4 Annex B). Any
failure becomes a failure status with an Error Comment; no exception escapes to pynetdicom.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import TypeAdapter, ValidationError
from pydicom.dataset import Dataset
from pynetdicom.events import Event

from dicom_listener.adapters.filestore import InstanceStore
from dicom_listener.adapters.publisher import EventPublisher
from dicom_listener.metrics import ListenerMetrics
from schemas.events import UID, InstanceReceivedV1

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 B.2.3 and PS3.7 C). The codes inside a range are this
# listener's own, so that a sender's log says which check failed.
#: Success.
SUCCESS = 0x0000
#: Refused: Out of Resources - the instance could not be written to the store. Retry later.
OUT_OF_RESOURCES_STORAGE = 0xA700
#: Refused: Out of Resources - Kafka did not acknowledge the event in time. Retry later.
OUT_OF_RESOURCES_PUBLISH = 0xA701
#: Error: Data Set does not match SOP Class - SOPClassUID differs from the negotiated class.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: Cannot understand - the dataset could not be decoded (pynetdicom's meaning of 0xC210).
CANNOT_UNDERSTAND_UNDECODABLE = 0xC210
#: Error: Cannot understand - a required UID is missing or empty.
CANNOT_UNDERSTAND_MISSING_UID = 0xC220
#: Error: Cannot understand - a required UID is not a valid UID (PS3.5 §9.1).
CANNOT_UNDERSTAND_INVALID_UID = 0xC221
#: Error: Cannot understand - SOPInstanceUID differs from the request's AffectedSOPInstanceUID.
CANNOT_UNDERSTAND_INSTANCE_MISMATCH = 0xC222

#: Attributes every stored instance must carry (type 1 in every composite IOD).
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Error Comment (0000,0902) is LO: at most 64 characters.
_ERROR_COMMENT_MAX = 64

_uid_adapter: TypeAdapter[str] = TypeAdapter(UID)


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, handed over by the app factory."""

    store: InstanceStore
    publisher: EventPublisher
    metrics: ListenerMetrics


class _Identity(NamedTuple):
    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    Modality: str | None


class _Refused(Exception):
    def __init__(self, status: int, reason: str, comment: str) -> None:
        super().__init__(comment)
        self.status, self.reason, self.comment = status, reason, comment


def status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE response status dataset, with an Error Comment when one is given."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _identify(event: Event) -> _Identity:
    """Read the UIDs the store and the event need, and check them against the request."""
    try:
        ds = event.dataset
        values = {keyword: _text(ds.get(keyword)) for keyword in REQUIRED_UIDS}
        modality = _text(ds.get("Modality"))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad input
        raise _Refused(
            CANNOT_UNDERSTAND_UNDECODABLE, "undecodable", "dataset could not be decoded"
        ) from exc
    for keyword, value in values.items():
        if not value:
            raise _Refused(CANNOT_UNDERSTAND_MISSING_UID, "missing_uid", f"{keyword} missing")
        try:
            _uid_adapter.validate_python(value)
        except ValidationError:
            raise _Refused(
                CANNOT_UNDERSTAND_INVALID_UID, "invalid_uid", f"{keyword} is not a valid UID"
            ) from None
    if values["SOPClassUID"] != str(event.context.abstract_syntax):
        raise _Refused(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "sop_class_mismatch",
            "SOPClassUID differs from the negotiated SOP Class",
        )
    if values["SOPInstanceUID"] != _text(event.request.AffectedSOPInstanceUID):
        raise _Refused(
            CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
            "sop_instance_mismatch",
            "SOPInstanceUID differs from AffectedSOPInstanceUID",
        )
    # Modality is CS (at most 16 characters); a malformed one is dropped, not fatal.
    return _Identity(**values, Modality=modality if 0 < len(modality) <= 16 else None)


def handle_store(event: Event, ctx: StoreContext) -> Dataset:
    """EVT_C_STORE: store durably, publish, and only then answer success."""
    uids: dict[str, str] = {"AffectedSOPInstanceUID": _text(event.request.AffectedSOPInstanceUID)}
    try:
        ident = _identify(event)
    except _Refused as refused:
        ctx.metrics.refused.labels(refused.reason).inc()
        log.warning("C-STORE refused: %s", refused.comment, extra=uids | {"reason": refused.reason})
        return status(refused.status, refused.comment)
    uids = {
        "StudyInstanceUID": ident.StudyInstanceUID,
        "SeriesInstanceUID": ident.SeriesInstanceUID,
        "SOPInstanceUID": ident.SOPInstanceUID,
    }

    started = time.perf_counter()
    try:
        stored = ctx.store.put(
            ident.StudyInstanceUID,
            ident.SeriesInstanceUID,
            ident.SOPInstanceUID,
            event.encoded_dataset(include_meta=True),
        )
    except Exception as exc:  # noqa: BLE001 - any failure to store is a refusal, never success
        ctx.metrics.refused.labels("storage_failed").inc()
        log.error("C-STORE failed: instance not stored: %r", exc, extra=uids)
        return status(OUT_OF_RESOURCES_STORAGE, "instance could not be stored")
    finally:
        ctx.metrics.store_seconds.observe(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        received = InstanceReceivedV1(
            StudyInstanceUID=ident.StudyInstanceUID,
            SeriesInstanceUID=ident.SeriesInstanceUID,
            SOPInstanceUID=ident.SOPInstanceUID,
            SOPClassUID=ident.SOPClassUID,
            TransferSyntaxUID=str(event.context.transfer_syntax),
            Modality=ident.Modality,
            storage_uri=stored.uri,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            calling_ae_title=event.assoc.requestor.ae_title,
            called_ae_title=event.assoc.acceptor.ae_title,
        )
        ctx.publisher.publish(received, key=ident.StudyInstanceUID)
    except Exception as exc:  # noqa: BLE001 - not acknowledged means not successful
        ctx.metrics.refused.labels("publish_failed").inc()
        log.error("C-STORE failed: event not acknowledged: %s", exc, extra=uids)
        return status(OUT_OF_RESOURCES_PUBLISH, "event not acknowledged by Kafka")
    finally:
        ctx.metrics.publish_seconds.observe(time.perf_counter() - started)

    ctx.metrics.received.inc()
    ctx.metrics.received_bytes.inc(stored.size_bytes)
    log.info(
        "instance received",
        extra=uids
        | {"size_bytes": stored.size_bytes, "calling_ae_title": received.calling_ae_title},
    )
    return status(SUCCESS)


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: the Verification service (PS3.4 Annex A) always succeeds when we are up."""
    return SUCCESS
