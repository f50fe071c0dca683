"""The listener's MPPS SCP (N-CREATE, N-SET) against pynetdicom as the modality: the statuses
of PS3.4 F.7 and PS3.7 C, a step that survives ``kill -9`` between its N-CREATE and its N-SET,
and the ``dicom.procedure.step.v1`` events the worker reads. dcmtk has no MPPS SCU tool, so
pynetdicom is the only peer here."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from devtools.kafka_local import LocalKafka, free_port, read_topic
from dicom_listener.tests.test_listener_crash import service_env, spawn_listener
from schemas.events import ProcedureStepV1

pytestmark = pytest.mark.integration

MODALITY = "MR1"


def in_progress(study_uid: str, status: str = "IN PROGRESS") -> Dataset:
    """An N-CREATE attribute list as a scanner sends it when a procedure starts."""
    ds = Dataset()
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid
    scheduled.AccessionNumber = "ACC1"
    ds.ScheduledStepAttributesSequence = [scheduled]
    ds.PatientID = "SW-MPPS"
    ds.Modality = "MR"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = MODALITY
    ds.PerformedProcedureStepStartDate = "20261205"
    ds.PerformedProcedureStepStartTime = "101500"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedSeriesSequence = []
    return ds


def completed(series: dict[str, list[str]], status: str = "COMPLETED") -> Dataset:
    """An N-SET attribute list ending the step, naming the instances of each series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261205"
    ds.PerformedProcedureStepEndTime = "102000"
    items = []
    for series_uid, sop_uids in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.PerformingPhysicianName = ""
        item.ProtocolName = "AX T2"
        item.RetrieveAETitle = ""
        item.ReferencedImageSequence = []
        for sop_uid in sop_uids:
            ref = Dataset()
            ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ref.ReferencedSOPInstanceUID = sop_uid
            item.ReferencedImageSequence.append(ref)
        items.append(item)
    ds.PerformedSeriesSequence = items
    return ds


@contextmanager
def mpps_association(
    port: int, calling_ae: str = MODALITY, called_ae: str = "SCANWATCH"
) -> Iterator[Association]:
    """An association of the modality's MPPS SCU with the listener on ``port``."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


@pytest.fixture
def listener(kafka: LocalKafka, tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    port = free_port()
    env = service_env(tmp_path, port, kafka)
    proc = spawn_listener(env, port)
    yield port, env
    stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def step_events(kafka: LocalKafka, study_uid: str, expected: int) -> list[ProcedureStepV1]:
    def of_study(read: list) -> list[ProcedureStepV1]:
        events = [ProcedureStepV1.from_bytes(r.value) for r in read]
        return [e for e in events if e.StudyInstanceUID == study_uid]

    records = read_topic(
        kafka.bootstrap_servers,
        ProcedureStepV1.SCHEMA,
        until=lambda read: len(of_study(read)) >= expected,
        timeout=30,
        settle_s=1.0,
    )
    return of_study(records)


def test_a_step_created_then_completed_survives_kill_9_between_them(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    sop_uids = [generate_uid() for _ in range(3)]
    step_uid = generate_uid()
    port = free_port()
    env = service_env(tmp_path, port, kafka)
    listener = spawn_listener(env, port)
    try:
        with mpps_association(port) as assoc:
            status, _ = assoc.send_n_create(
                in_progress(study_uid), ModalityPerformedProcedureStep, step_uid
            )
            assert status.Status == 0x0000
        listener.send_signal(signal.SIGKILL)
        listener.wait()
        listener = spawn_listener(env, port)
        with mpps_association(port) as assoc:
            status, _ = assoc.send_n_set(
                completed({series_uid: sop_uids}), ModalityPerformedProcedureStep, step_uid
            )
            assert status.Status == 0x0000, "the step created before the kill is still known"
        events = step_events(kafka, study_uid, expected=2)
    finally:
        stop(listener)
    assert [e.status for e in events] == ["IN PROGRESS", "COMPLETED"]
    assert {e.procedure_step_uid for e in events} == {step_uid}
    assert events[0].instances == []
    assert [(r.SeriesInstanceUID, r.SOPInstanceUID) for r in events[1].instances] == [
        (series_uid, uid) for uid in sop_uids
    ]
    assert events[1].step_studies == [study_uid]
    assert events[1].calling_ae_title == MODALITY
    # The step kept durably: its status and UIDs, not the patient module the MPPS carried.
    outbox = tmp_path / "store" / ".scanwatch" / "outbox.sqlite3"
    with closing(sqlite3.connect(outbox)) as db:
        [(status, kept)] = db.execute("SELECT status, dataset FROM procedure_steps").fetchall()
    assert status == "COMPLETED" and all(uid in kept for uid in sop_uids)
    assert "SW-MPPS" not in kept


def test_the_scp_assigns_a_uid_when_the_modality_leaves_it_out(
    kafka: LocalKafka, listener: tuple[int, dict[str, str]]
) -> None:
    study_uid = generate_uid()
    port, _ = listener
    with mpps_association(port) as assoc:
        status, _ = assoc.send_n_create(in_progress(study_uid), ModalityPerformedProcedureStep)
        assert status.Status == 0x0000
    # pynetdicom does not hand back the response's Affected SOP Instance UID: read it from
    # the event, then end the step under it.
    (created,) = step_events(kafka, study_uid, expected=1)
    assigned = created.procedure_step_uid
    assert assigned.startswith("2.25.")
    with mpps_association(port) as assoc:
        status, _ = assoc.send_n_set(
            completed({}, "DISCONTINUED"), ModalityPerformedProcedureStep, assigned
        )
        assert status.Status == 0x0000
    events = step_events(kafka, study_uid, expected=2)
    assert [(e.procedure_step_uid, e.status) for e in events] == [
        (assigned, "IN PROGRESS"),
        (assigned, "DISCONTINUED"),
    ]


def test_refusals_carry_the_standard_statuses_and_record_nothing(
    kafka: LocalKafka, listener: tuple[int, dict[str, str]]
) -> None:
    study_uid = generate_uid()
    step_uid = generate_uid()
    port, _ = listener
    mpps = ModalityPerformedProcedureStep
    no_study = in_progress(study_uid)
    no_study.ScheduledStepAttributesSequence[0].StudyInstanceUID = ""
    with mpps_association(port) as assoc:
        # N-CREATE must be IN PROGRESS (PS3.4 F.7.2.1.1): Invalid Attribute Value.
        status, _ = assoc.send_n_create(in_progress(study_uid, "COMPLETED"), mpps, step_uid)
        assert status.Status == 0x0106
        # A step naming no study: Missing Attribute.
        status, _ = assoc.send_n_create(no_study, mpps, step_uid)
        assert status.Status == 0x0120
        # N-SET of a step never created: No Such SOP Instance.
        status, _ = assoc.send_n_set(completed({}), mpps, step_uid)
        assert status.Status == 0x0112
        status, _ = assoc.send_n_create(in_progress(study_uid), mpps, step_uid)
        assert status.Status == 0x0000
        # The same step created twice: Duplicate SOP Instance.
        status, _ = assoc.send_n_create(in_progress(study_uid), mpps, step_uid)
        assert status.Status == 0x0111
        # A status the standard does not have: Invalid Attribute Value, the step unchanged.
        status, _ = assoc.send_n_set(completed({}, "DONE"), mpps, step_uid)
        assert status.Status == 0x0106
        status, _ = assoc.send_n_set(completed({}), mpps, step_uid)
        assert status.Status == 0x0000
        # A final step may no longer be updated (PS3.4 F.7.2.2.2): Processing Failure.
        status, _ = assoc.send_n_set(completed({}, "DISCONTINUED"), mpps, step_uid)
        assert status.Status == 0x0110
        assert "no longer" in status.ErrorComment
    events = step_events(kafka, study_uid, expected=2)
    assert [e.status for e in events] == ["IN PROGRESS", "COMPLETED"]
