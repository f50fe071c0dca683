"""The listener's Storage Commitment SCP (push model) against pynetdicom as the sender: the
result on the same association, and on a new one to the sender's own listener when it will not
take it there. Only instances stored durably are committed; the others are failed with their
reason. dcmtk has no Storage Commitment SCU tool, so pynetdicom is the only peer here."""

from __future__ import annotations

import json
import threading
import uuid
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from devtools.kafka_local import LocalKafka, free_port
from devtools.peers import storescu
from devtools.testing import wait_for
from dicom_listener.adapters.filestore import FileStore
from dicom_listener.adapters.outbox import Outbox, OutboxTransaction
from dicom_listener.storage_commitment import commitment_result
from dicom_listener.tests.test_listener_crash import service_env, spawn_listener
from dicom_listener.tests.test_procedure_steps import stop
from scanwatch.sample import build_mr_study

pytestmark = pytest.mark.integration

SENDER = "MR1"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"


def commitment_request(transaction: str, sop_uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for uid in sop_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = MR
        item.ReferencedSOPInstanceUID = uid
        ds.ReferencedSOPSequence.append(item)
    return ds


class Reports:
    """N-EVENT-REPORTs a pynetdicom handler took, answered with ``status``."""

    def __init__(self, status: int = 0x0000) -> None:
        self.status = status
        self.taken: list[tuple[int, Dataset]] = []
        self.lock = threading.Lock()

    def handle(self, event: evt.Event) -> tuple[int, None]:
        with self.lock:
            self.taken.append((event.request.EventTypeID, event.event_information))
        return self.status, None


def stored_study(tmp_path: Path, port: int) -> list[str]:
    files = build_mr_study(
        tmp_path / "sent", patient_id=f"SW-SC-{uuid.uuid4().hex[:8]}", n_slices=3
    )
    storescu(files, "127.0.0.1", port, called_ae="SCANWATCH", calling_ae=SENDER)
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def ask(port: int, request: Dataset, reports: Reports) -> int:
    """Send the N-ACTION; once answered, wait (on the open association) for the result."""
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handle)]
    assoc = ae.associate("127.0.0.1", port, ae_title="SCANWATCH", evt_handlers=handlers)
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, WELL_KNOWN)
        wait_for(lambda: reports.taken, 10, "the commitment result on the same association")
    finally:
        assoc.release()
    return int(status.Status)


def sequence_uids(ds: Dataset, name: str) -> dict[str, int | None]:
    return {item.ReferencedSOPInstanceUID: item.get("FailureReason") for item in ds.get(name, [])}


def test_stored_instances_are_committed_and_others_failed_on_the_same_association(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    port = free_port()
    listener = spawn_listener(service_env(tmp_path, port, kafka), port)
    try:
        stored = stored_study(tmp_path, port)
        never_sent = generate_uid()
        transaction = generate_uid()
        reports = Reports()
        assert ask(port, commitment_request(transaction, [*stored, never_sent]), reports) == 0
    finally:
        stop(listener)
    [(event_type, result)] = reports.taken
    assert event_type == 2  # some failed
    assert result.TransactionUID == transaction
    assert sequence_uids(result, "ReferencedSOPSequence") == dict.fromkeys(stored)
    assert sequence_uids(result, "FailedSOPSequence") == {never_sent: 0x0112}


def test_a_result_the_sender_will_not_take_is_sent_to_its_own_listener(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    delivered = Reports()
    peer = AE(ae_title=SENDER)
    peer.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    peer_port = free_port()
    server = peer.start_server(
        ("127.0.0.1", peer_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, delivered.handle)],
    )
    port = free_port()
    env = service_env(
        tmp_path, port, kafka, commitment_peers=json.dumps({SENDER: f"127.0.0.1:{peer_port}"})
    )
    listener = spawn_listener(env, port)
    try:
        stored = stored_study(tmp_path, port)
        refused = Reports(status=0x0110)  # "not here": this sender takes results on its listener
        assert ask(port, commitment_request(generate_uid(), stored), refused) == 0
        wait_for(lambda: delivered.taken, 30, "the result on a new association to the sender")
    finally:
        stop(listener)
        server.shutdown()
    [(event_type, result)] = delivered.taken
    assert event_type == 1  # all committed
    assert sequence_uids(result, "ReferencedSOPSequence") == dict.fromkeys(stored)
    assert "FailedSOPSequence" not in result


def test_an_instance_recorded_but_gone_from_the_store_is_not_committed(tmp_path: Path) -> None:
    """The record alone is not enough: the file must still be in the store (0x0110 if not)."""
    outbox, store = Outbox(tmp_path / "outbox.sqlite3"), FileStore(tmp_path / "store")
    outbox.open()
    kept, gone = generate_uid(), generate_uid()
    for uid in (kept, gone):
        path = store.root / "1.2" / "1.2.3" / f"{uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"DICM")
        record = partial(
            OutboxTransaction.record,
            sop_uid=uid,
            sha256="ab" * 32,
            version=1,
            storage_uri=path.as_uri(),
            topic="t",
            key=b"k",
            value=b"v",
        )
        outbox.submit(record)
    (store.root / "1.2" / "1.2.3" / f"{gone}.dcm").unlink()
    event_type, result = commitment_result(
        "1.2.9", [(MR, kept), (MR, gone), (MR, "1.2.10")], outbox, store
    )
    outbox.close()
    assert event_type == 2
    assert sequence_uids(result, "ReferencedSOPSequence") == {kept: None}
    assert sequence_uids(result, "FailedSOPSequence") == {gone: 0x0110, "1.2.10": 0x0112}
