"""The Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET, as plain
functions of the request (STYLE habit 1), like the C-STORE handler.

A modality creates a step (N-CREATE, status IN PROGRESS) when a procedure starts, and sets it
(N-SET) as it goes; COMPLETED lists in its Performed Series Sequence every instance the
procedure produced, DISCONTINUED says it was abandoned. Either is final: the step may no longer
be updated. Each accepted request is recorded durably before it is answered, in one transaction
of the listener's outbox: the step's status, studies and instances (``procedure_steps``: not
the patient's name or ID the step also carries) and one
``dicom.procedure.step.v1`` event per study the step names, keyed like that study's instance
events. A listener killed between N-CREATE and N-SET has lost nothing: the N-SET finds the
step it created. The worker uses the events to release a study as soon as the step's instances
are stored (:mod:`inference_worker.assembly`).
"""

from __future__ import annotations

import io
import logging
import uuid

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_listener.adapters.outbox import OutboxTransaction, ProcedureStep
from dicom_listener.dicom.contract import NormalizedRequest, NormalizedResponse, Status
from dicom_listener.dicom.statuses import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)
from dicom_listener.handlers import StoreContext
from scanwatch.store_layout import is_uid
from schemas.events import ProcedureStepV1, StepInstanceRef

log = logging.getLogger(__name__)

#: Modality Performed Procedure Step SOP Class (PS3.4 F.7.1).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)


class _Refused(Exception):
    def __init__(self, code: int, comment: str) -> None:
        super().__init__(comment)
        self.status = Status(code, comment)


def _decode(request: NormalizedRequest) -> Dataset:
    """The request's attribute list, or a refusal naming why it cannot be read."""
    if not request.dataset:
        raise _Refused(MISSING_ATTRIBUTE, f"{request.command} without an attribute list")
    try:
        return read_dataset(
            io.BytesIO(request.dataset),
            is_implicit_VR=request.transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=request.transfer_syntax != ExplicitVRBigEndian,
        )
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise _Refused(PROCESSING_FAILURE, "attribute list could not be decoded") from exc


def _status_of(ds: Dataset) -> str:
    value = str(ds.get("PerformedProcedureStepStatus", "") or "").strip()
    if value not in _STATUSES:
        raise _Refused(
            INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus {value[:20]!r} not allowed"
        )
    return value


def studies_of(ds: Dataset) -> list[str]:
    """The StudyInstanceUIDs the step names (Scheduled Step Attributes Sequence), in order."""
    found: list[str] = []
    for item in ds.get("ScheduledStepAttributesSequence", []):
        uid = str(item.get("StudyInstanceUID", "") or "").strip()
        if is_uid(uid) and uid not in found:
            found.append(uid)
    return found


def instances_of(ds: Dataset) -> list[StepInstanceRef]:
    """The instances the step references: images and other composites of each performed
    series (PS3.3 C.4.14, Performed Series Sequence)."""
    refs: list[StepInstanceRef] = []
    for series in ds.get("PerformedSeriesSequence", []):
        series_uid = str(series.get("SeriesInstanceUID", "") or "").strip()
        for name in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(name, []):
                sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                if is_uid(series_uid) and is_uid(sop_uid):
                    refs.append(
                        StepInstanceRef(SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
                    )
    return refs


def _kept(ds: Dataset) -> Dataset:
    """What the listener keeps of a step: its status, its studies and the instances it names,
    nothing about the patient (an MPPS carries the patient's name, ID and birth date)."""
    kept = Dataset()
    kept.PerformedProcedureStepStatus = ds.get("PerformedProcedureStepStatus", "")
    scheduled = []
    for uid in studies_of(ds):
        item = Dataset()
        item.StudyInstanceUID = uid
        scheduled.append(item)
    kept.ScheduledStepAttributesSequence = scheduled
    series: dict[str, list[str]] = {}
    for ref in instances_of(ds):
        series.setdefault(ref.SeriesInstanceUID, []).append(ref.SOPInstanceUID)
    performed = []
    for series_uid, sop_uids in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedImageSequence = []
        for sop_uid in sop_uids:
            image = Dataset()
            image.ReferencedSOPInstanceUID = sop_uid
            item.ReferencedImageSequence.append(image)
        performed.append(item)
    kept.PerformedSeriesSequence = performed
    return kept


def _events(uid: str, ds: Dataset, status: str, calling_ae_title: str) -> list[ProcedureStepV1]:
    studies = studies_of(ds)
    instances = instances_of(ds)
    return [
        ProcedureStepV1(
            StudyInstanceUID=study,
            procedure_step_uid=uid,
            status=status,
            step_studies=studies,
            instances=instances,
            calling_ae_title=calling_ae_title,
        )
        for study in studies
    ]


def _create(request: NormalizedRequest, tx: OutboxTransaction) -> tuple[str, str]:
    ds = _decode(request)
    status = _status_of(ds)
    if status != IN_PROGRESS:  # PS3.4 F.7.2.1.1: a step is created in progress
        raise _Refused(INVALID_ATTRIBUTE_VALUE, "an N-CREATE must be IN PROGRESS")
    if not studies_of(ds):
        raise _Refused(MISSING_ATTRIBUTE, "no StudyInstanceUID in ScheduledStepAttributesSequence")
    uid = request.sop_instance_uid or f"2.25.{uuid.uuid4().int}"
    if not is_uid(uid):
        raise _Refused(INVALID_ATTRIBUTE_VALUE, "Affected SOP Instance UID is not a UID")
    if tx.procedure_step(uid) is not None:
        raise _Refused(DUPLICATE_SOP_INSTANCE, "this procedure step exists already")
    _record(tx, uid, status, request.calling_ae_title, ds)
    return uid, status


def _set(request: NormalizedRequest, tx: OutboxTransaction) -> tuple[str, str]:
    uid = request.sop_instance_uid
    step = tx.procedure_step(uid) if is_uid(uid) else None
    if step is None:
        raise _Refused(NO_SUCH_SOP_INSTANCE, "no such procedure step")
    if step.status != IN_PROGRESS:  # PS3.4 F.7.2.2.2
        raise _Refused(PROCESSING_FAILURE, f"step is {step.status}: may no longer be updated")
    ds = Dataset.from_json(step.dataset)
    ds.update(_decode(request))
    status = _status_of(ds)
    _record(tx, uid, status, step.calling_ae_title, ds)
    return uid, status


def _record(
    tx: OutboxTransaction, uid: str, status: str, calling_ae_title: str, ds: Dataset
) -> None:
    """The step as kept (:func:`_kept`) and its events, in the caller's transaction."""
    tx.save_procedure_step(ProcedureStep(uid, status, _kept(ds).to_json(), calling_ae_title))
    for event in _events(uid, ds, status, calling_ae_title):
        tx.emit(event.SCHEMA, event.StudyInstanceUID.encode(), event.to_bytes())


def handle_procedure_step(request: NormalizedRequest, ctx: StoreContext) -> NormalizedResponse:
    """Create or set a Modality Performed Procedure Step, durably, then answer.

    Refusals carry their PS3.7 C status with an Error Comment: an attribute list that cannot
    be read, a status other than the standard's three, an N-CREATE that is not IN PROGRESS or
    names no study, a duplicate N-CREATE, an N-SET of an unknown or final step.
    """
    if request.sop_class_uid != MPPS_SOP_CLASS:
        return NormalizedResponse(Status(SOP_CLASS_NOT_SUPPORTED, "only MPPS is served"))
    work = _create if request.command == "N-CREATE" else _set
    try:
        uid, status = ctx.outbox.submit(lambda tx: work(request, tx))
    except _Refused as refused:
        ctx.metrics.procedure_steps.labels(request.command, "refused").inc()
        log.warning(
            "procedure step refused",
            extra={
                "command": request.command,
                "reason": str(refused),
                "calling_ae_title": request.calling_ae_title,
            },
        )
        return NormalizedResponse(refused.status, request.sop_instance_uid)
    except Exception as exc:  # noqa: BLE001 - not recorded means not successful
        ctx.metrics.procedure_steps.labels(request.command, "failed").inc()
        log.error("procedure step not recorded: %r", exc, extra={"command": request.command})
        return NormalizedResponse(
            Status(PROCESSING_FAILURE, "not recorded; try again"), request.sop_instance_uid
        )
    ctx.metrics.procedure_steps.labels(request.command, status).inc()
    log.info(
        "procedure step recorded",
        extra={
            "command": request.command,
            "procedure_step_uid": uid,
            "status": status,
            "calling_ae_title": request.calling_ae_title,
        },
    )
    return NormalizedResponse(Status(SUCCESS), uid)
