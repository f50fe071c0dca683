"""The listener's DICOM Upper Layer against pynetdicom as an independent peer (no Kafka, no
outbox): negotiation, association limits, response fragmentation, aborts and bad PDUs."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from devtools.testing import wait_for
from dicom_listener.dicom.association import ServerConfig
from dicom_listener.dicom.contract import Peer, ReceivedInstance, Status
from dicom_listener.dicom.dimse import C_STORE_RQ, encode_command
from dicom_listener.dicom.file_meta import file_meta_bytes
from dicom_listener.dicom.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    encode_associate_ac,
    parse_associate_rq,
)
from dicom_listener.dicom.server import StorageServer
from dicom_listener.dicom.statuses import SUCCESS
from dicom_listener.dicom.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    VERIFICATION,
)

AE_TITLE = "SCANWATCH"


class Recorder:
    """A store function that keeps what it was handed (and the file's bytes), and answers
    ``answer``; on success it takes the file (removes it), as the real handler does."""

    def __init__(self) -> None:
        self.received: list[tuple[ReceivedInstance, bytes]] = []
        self.answer = Status(SUCCESS)

    def __call__(self, received: ReceivedInstance) -> Status:
        self.received.append((received, received.path.read_bytes()))
        if self.answer.Status == SUCCESS:
            received.path.unlink()
        return self.answer


@contextmanager
def serve(tmp_path: Path, store: Recorder, **config: object) -> Iterator[StorageServer]:
    settings = ServerConfig(
        contexts={
            VERIFICATION: frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian}),
            MRImageStorage: frozenset({ExplicitVRLittleEndian}),
        },
        incoming_dir=tmp_path / "incoming",
        **config,  # type: ignore[arg-type]
    )
    admit = lambda peer: (0x07, "called") if peer.called_ae_title != AE_TITLE else None  # noqa: E731
    server = StorageServer(settings, admit, store, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(tmp_path: Path, recorder: Recorder) -> Iterator[StorageServer]:
    with serve(tmp_path, recorder) as running:
        yield running


def scu(max_pdu: int = 16382) -> AE:
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage)
    return ae


def test_negotiation_as_pynetdicom_decodes_it() -> None:
    """Our A-ASSOCIATE-AC, decoded by an independent implementation, says what we decided."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = AE_TITLE
    primitive.presentation_context_definition_list = [
        build_context(MRImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        build_context(CTImageStorage),
    ]
    for i, cx in enumerate(primitive.presentation_context_definition_list):
        cx.context_id = 2 * i + 1
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 32768
    primitive.user_information = [max_length]
    rq_pdu = A_ASSOCIATE_RQ()
    rq_pdu.from_primitive(primitive)

    rq = parse_associate_rq(rq_pdu.encode()[6:])
    assert (rq.called_ae_title, rq.calling_ae_title) == (AE_TITLE, "MODALITY")
    assert rq.max_pdu_size == 32768
    assert [(c.context_id, c.abstract_syntax) for c in rq.contexts] == [
        (1, MRImageStorage),
        (3, CTImageStorage),
    ]

    results = [
        (1, ACCEPTANCE, ExplicitVRLittleEndian),
        (3, ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
    ]
    ac = A_ASSOCIATE_AC()
    ac.decode(encode_associate_ac(rq, results, 65536))
    decoded = ac.to_primitive()
    assert decoded.result == 0
    assert decoded.maximum_length_received == 65536
    by_id = {cx.context_id: cx for cx in decoded.presentation_context_definition_results_list}
    assert by_id[1].result == ACCEPTANCE and by_id[1].transfer_syntax == [ExplicitVRLittleEndian]
    assert by_id[3].result == ABSTRACT_SYNTAX_NOT_SUPPORTED


def test_store_and_echo_with_a_tiny_peer_pdu_fragment_the_responses(
    server: StorageServer, recorder: Recorder, mr_series: list[Path]
) -> None:
    """A peer that receives 64-byte PDUs still gets whole responses (fragmented commands)."""
    assoc = scu(max_pdu=64).associate("127.0.0.1", server.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        results = {cx.abstract_syntax: cx.result for cx in assoc.accepted_contexts}
        assert results[MRImageStorage] == ACCEPTANCE
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CTImageStorage]
        assert assoc.send_c_echo().Status == SUCCESS
        ds = pydicom.dcmread(mr_series[0])
        assert assoc.send_c_store(ds).Status == SUCCESS
    finally:
        assoc.release()
    [(received, data)] = recorder.received
    assert received.affected_sop_instance_uid == ds.SOPInstanceUID
    assert received.calling_ae_title == "MODALITY" and received.called_ae_title == AE_TITLE
    assert received.transfer_syntax == ExplicitVRLittleEndian
    stored = pydicom.dcmread(BytesIO(data))
    assert received.size_bytes == len(data)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData
    assert wait_for(lambda: not any(server.config.incoming_dir.iterdir()), timeout=5)


def test_a_failure_answer_leaves_no_temporary_file(
    server: StorageServer, recorder: Recorder, mr_series: list[Path]
) -> None:
    """The handler keeps the file only when it answers success; else the association
    removes it, and the sender gets the handler's status."""
    recorder.answer = Status(0xA700, "no room")
    assoc = scu().associate("127.0.0.1", server.port, ae_title=AE_TITLE)
    try:
        assert assoc.send_c_store(pydicom.dcmread(mr_series[0])).Status == 0xA700
    finally:
        assoc.release()
    [(received, _)] = recorder.received
    assert not received.path.exists()
    assert not any(server.config.incoming_dir.iterdir())


def test_each_association_is_logged_once_with_what_it_stored(
    server: StorageServer,
    recorder: Recorder,
    mr_series: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One INFO line per association, with how many instances were stored and refused (each
    instance's own line is DEBUG)."""
    caplog.set_level(logging.INFO, logger="dicom_listener")
    assoc = scu().associate("127.0.0.1", server.port, ae_title=AE_TITLE)
    try:
        for path in mr_series[:2]:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == SUCCESS
        recorder.answer = Status(0xA700, "no room")
        assert assoc.send_c_store(pydicom.dcmread(mr_series[2])).Status == 0xA700
    finally:
        assoc.release()

    def ended() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "association ended"]

    [record] = wait_for(ended, timeout=5, what="the association's log line")
    assert record.levelno == logging.INFO
    fields = vars(record)
    assert (fields["calling_ae_title"], fields["stored"], fields["refused"]) == ("MODALITY", 2, 1)


def test_transfer_syntax_not_offered_is_refused_per_context(server: StorageServer) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage, [ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AE_TITLE)
    try:
        assert assoc.is_established
        [refused] = assoc.rejected_contexts
        assert refused.result == TRANSFER_SYNTAXES_NOT_SUPPORTED
    finally:
        assoc.release()


def test_association_limit_rejects_transiently_and_frees_the_slot(
    tmp_path: Path, recorder: Recorder
) -> None:
    with serve(tmp_path, recorder, max_associations=1) as server:
        first = scu().associate("127.0.0.1", server.port, ae_title=AE_TITLE)
        assert first.is_established
        second = scu().associate("127.0.0.1", server.port, ae_title=AE_TITLE)
        assert second.is_rejected
        first.release()
        third = scu().associate("127.0.0.1", server.port, ae_title=AE_TITLE)
        assert third.is_established
        third.release()


def test_wrong_called_ae_is_rejected(server: StorageServer) -> None:
    assoc = scu().associate("127.0.0.1", server.port, ae_title="SOMEONE")
    assert assoc.is_rejected


def test_a_rejected_requestor_that_never_closes_is_closed_after_artim(
    tmp_path: Path, recorder: Recorder
) -> None:
    """After an A-ASSOCIATE-RJ the listener waits for the requestor to close (Sta13), so the
    RJ reaches it before any close; one that never closes is dropped (the ARTIM bound)."""
    with serve(tmp_path, recorder, network_timeout_s=0.3) as server:
        sock = _request_raw(server.port, called="SOMEONE")
        sock.settimeout(10)
        kind, length = struct.unpack(">BxL", sock.recv(6, socket.MSG_WAITALL))
        assert (kind, length) == (0x03, 4), "A-ASSOCIATE-RJ"
        # rejected permanent, by the service user, called AE title not recognised
        assert sock.recv(4, socket.MSG_WAITALL) == b"\x00\x01\x01\x07"
        assert sock.recv(16) == b"", "the listener closes the connection"
        sock.close()


def _request_raw(port: int, called: str = AE_TITLE) -> socket.socket:
    """A raw socket that has sent an A-ASSOCIATE-RQ for MR Image Storage (context 1)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAW"
    primitive.called_ae_title = called
    cx = build_context(MRImageStorage, [ExplicitVRLittleEndian])
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    primitive.user_information = []
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(rq.encode())
    return sock


def _associate_raw(port: int) -> socket.socket:
    """A raw socket with an association for MR Image Storage (context 1) established."""
    sock = _request_raw(port)
    kind, length = struct.unpack(">BxL", sock.recv(6, socket.MSG_WAITALL))
    sock.recv(length, socket.MSG_WAITALL)
    assert kind == 0x02
    return sock


def _pdata(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def test_connection_lost_mid_dataset_leaves_nothing_behind(
    server: StorageServer, recorder: Recorder, mr_series: list[Path]
) -> None:
    sock = _associate_raw(server.port)
    uid = pydicom.dcmread(mr_series[0]).SOPInstanceUID.encode()
    command = encode_command(
        {
            0x00000002: MRImageStorage.encode() + b"\x00",
            0x00000100: struct.pack("<H", C_STORE_RQ),
            0x00000110: struct.pack("<H", 7),
            0x00000700: struct.pack("<H", 0),
            0x00000800: struct.pack("<H", 0x0000),
            0x00001000: uid + b"\x00" * (len(uid) % 2),
        }
    )
    sock.sendall(_pdata(1, 0x03, command) + _pdata(1, 0x00, b"\x08\x00" * 500))
    assert wait_for(lambda: any(server.config.incoming_dir.iterdir()), timeout=5)
    sock.close()
    assert wait_for(lambda: not any(server.config.incoming_dir.iterdir()), timeout=5)
    assert wait_for(lambda: server.active_associations == 0, timeout=5)
    assert recorder.received == []


def test_pdu_larger_than_advertised_is_aborted(tmp_path: Path, recorder: Recorder) -> None:
    with serve(tmp_path, recorder, max_pdu_size=1024) as server:
        sock = _associate_raw(server.port)
        sock.sendall(_pdata(1, 0x00, bytes(4096)))
        kind, _ = struct.unpack(">BxL", sock.recv(6, socket.MSG_WAITALL))
        assert kind == 0x07  # A-ABORT
        assert sock.recv(16, socket.MSG_WAITALL)[-2:] == b"\x02\x06"  # provider, invalid param
        sock.close()
        assert recorder.received == []


def test_admission_sees_the_peer_address(tmp_path: Path, recorder: Recorder) -> None:
    seen: list[Peer] = []
    config = ServerConfig(
        contexts={VERIFICATION: frozenset({ImplicitVRLittleEndian})},
        incoming_dir=tmp_path / "incoming",
    )
    server = StorageServer(config, lambda p: seen.append(p), recorder, "127.0.0.1", 0)  # type: ignore[func-returns-value]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ae = AE(ae_title="ECHOER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title=AE_TITLE)
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [Peer(AE_TITLE, "ECHOER", "127.0.0.1")]


def test_file_meta_is_what_pydicom_writes() -> None:
    """Our hand-encoded File Meta against pydicom's writer for the same values."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # odd length: padded
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)

    ours = file_meta_bytes(MRImageStorage, "1.2.826.0.1.3680043.8.498.1", ExplicitVRLittleEndian)
    assert ours == bytes(128) + b"DICM" + out.getvalue()


def test_a_silent_peer_is_dropped_after_the_network_timeout(
    tmp_path: Path, recorder: Recorder
) -> None:
    with serve(tmp_path, recorder, network_timeout_s=0.3) as server:
        sock = _associate_raw(server.port)  # associated, then says nothing
        sock.settimeout(10)
        assert sock.recv(16) == b"", "the listener closes the connection"
        assert wait_for(lambda: server.active_associations == 0, timeout=5)
        sock.close()
