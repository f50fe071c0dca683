"""Helpers of the listener's integration tests: waiting, reading events, a TCP gate."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pydicom

from devtools.kafka_local import Record, read_topic
from devtools.testing import wait_for  # noqa: F401 - re-exported for the listener tests
from schemas.events import InstanceReceivedV1


def received_events(
    bootstrap_servers: str,
    study_uids: set[str],
    expected: int,
    timeout: float = 30.0,
) -> list[tuple[bytes, InstanceReceivedV1, dict[str, bytes]]]:
    """Events of ``study_uids`` on the topic (key, event, headers), polled until ``expected``
    arrived or time is up (then a further short poll, so extra events would be seen too)."""

    def of_studies(read: list[Record]) -> list[tuple[bytes, InstanceReceivedV1, dict]]:
        events = [(r.key or b"", InstanceReceivedV1.from_bytes(r.value), r.headers) for r in read]
        return [e for e in events if e[1].StudyInstanceUID in study_uids]

    records = read_topic(
        bootstrap_servers,
        InstanceReceivedV1.SCHEMA,
        until=lambda read: len(of_studies(read)) >= expected,
        timeout=timeout,
        settle_s=1.0,
    )
    return of_studies(records)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class TcpGate:
    """A TCP forwarder on ``port`` to ``target``, closed until :meth:`open` (a Kafka bootstrap
    address that is unreachable first and reachable later)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._server: socket.socket | None = None
        self._stop = threading.Event()

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()


class WireTap:
    """A one-connection TCP forwarder to ``target`` that records what the client sent, so a
    test can see the exact bytes of each C-STORE dataset on the wire."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(30)
        self.port = int(self._server.getsockname()[1])
        self.sent = bytearray()
        self.answered = bytearray()
        self._done = threading.Event()
        self._accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            client, _ = self._server.accept()
        except OSError:
            self._done.set()
            return
        self._accepted.set()
        upstream = socket.create_connection(self.target)
        back = threading.Thread(target=self._answers, args=(upstream, client), daemon=True)
        back.start()
        try:
            while data := client.recv(65536):
                self.sent += data
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            back.join(timeout=5)
            self._done.set()

    def _answers(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.answered += data
                dst.sendall(data)
        except OSError:
            pass

    def statuses(self) -> list[int]:
        """Status (0000,0900) of each DIMSE response the server sent (call after datasets())."""
        return [int(ds.Status) for ds in responses(bytes(self.answered)) if "Status" in ds]

    def datasets(self, timeout: float = 10) -> list[bytes]:
        """The C-STORE datasets the client sent, reassembled from P-DATA-TF PDUs (PS3.8 9.3.5,
        PDVs: PS3.8 E.2). Call it after the client exited: a connection it made is then
        already waiting to be accepted."""
        if self._accepted.wait(0.5):
            self._done.wait(timeout)
        self._server.close()
        return _messages(bytes(self.sent), commands=False)


def _messages(stream: bytes, commands: bool) -> list[bytes]:
    """Command sets (or datasets) reassembled from the P-DATA-TF PDUs of one direction."""
    i = 0
    out: list[bytes] = []
    current = bytearray()
    while i + 6 <= len(stream):
        pdu_type, length = stream[i], int.from_bytes(stream[i + 2 : i + 6], "big")
        body, i = stream[i + 6 : i + 6 + length], i + 6 + length
        if pdu_type != 0x04:  # not P-DATA-TF
            continue
        j = 0
        while j + 6 <= len(body):
            n = int.from_bytes(body[j : j + 4], "big")
            control, data = body[j + 5], body[j + 6 : j + 4 + n]
            j += 4 + n
            if bool(control & 0x01) != commands:  # bit 0: command (1) or dataset (0)
                continue
            current += data
            if control & 0x02:  # last fragment
                out.append(bytes(current))
                current = bytearray()
    return out


def responses(answered: bytes) -> list[pydicom.Dataset]:
    """The Command Set of each DIMSE response in what a server sent (P-DATA-TF PDUs)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    return [
        read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
        for command in _messages(answered, commands=True)
    ]


def pdu_types(answered: bytes) -> list[int]:
    """The type of each whole PDU in what a server sent (PS3.8 9.3.1)."""
    i, types = 0, []
    while i + 6 <= len(answered):
        length = int.from_bytes(answered[i + 2 : i + 6], "big")
        if i + 6 + length > len(answered):
            break
        types.append(answered[i])
        i += 6 + length
    return types
