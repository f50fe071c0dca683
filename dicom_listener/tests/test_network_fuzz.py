"""A network fuzzer against a running listener (real Kafka behind it): mutated association
requests, PDU lengths that lie, P-DATA on the wrong presentation context, fragments out of
order, datasets whose element lengths lie, abrupt disconnects, and UIDs that would be paths.

Each case is sent on a raw TCP connection, which the test then half-closes; the listener must
answer within a bounded time with what PS3.8 / PS3.7 say (an A-ASSOCIATE-RJ, an A-ABORT, or a
C-STORE failure status that names the problem), never with success, and close the connection.
After every case dcmtk's echoscu and storescu (real peers) must still get C-ECHO and C-STORE
success. At the end, the store holds exactly the well-formed instances, nothing was written
outside it, no temporary file is left, and Kafka carries events for those instances only.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from devtools.kafka_local import LocalKafka
from devtools.peers import echoscu, storescu
from devtools.testing import wait_for
from dicom_listener.app import ListenerApp
from dicom_listener.dicom.dimse import encode_command
from dicom_listener.dicom.pdu import A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF
from dicom_listener.dicom.statuses import (
    CANNOT_UNDERSTAND_INVALID_UID,
    CANNOT_UNDERSTAND_TRUNCATED,
    CANNOT_UNDERSTAND_UNDECODABLE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    SUCCESS,
)
from dicom_listener.fuzz import seeds
from dicom_listener.fuzz.seeds import MR_CONTEXT, hostile_uids, mr_small, with_uids
from dicom_listener.tests.helpers import pdu_types, received_events, responses
from dicom_listener.tests.test_listener_integration import AE_TITLE, start_listener

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

#: Bound on every wait for the listener's answer (its network timeout is 2 s).
ANSWER_TIMEOUT_S = 15.0
#: Mutated association requests sent (seeded: the same cases every run).
RQ_MUTATIONS = 40
ESCAPED = Path("/tmp/scanwatch-escaped")


@dataclass
class Run:
    """The listener under test and what the cases sent."""

    app: ListenerApp
    base: Path
    good: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> StudyInstanceUID
    refused_studies: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def run(kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("network-fuzz")
    app = start_listener(
        base, kafka_bootstrap_servers=kafka.bootstrap_servers, network_timeout_s=2.0
    )
    yield Run(app, base)
    app.stop()


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection, half-close it, and read until the listener closes
    (bounded): what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the listener aborted and closed before reading everything
            pass
        answer = bytearray()
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"no end of answer within {ANSWER_TIMEOUT_S} s (hang)")
    return bytes(answer)


def pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BxL", P_DATA_TF, len(pdv)) + pdv


def store_rq(affected: bytes, message_id: int = 9) -> bytes:
    """A C-STORE-RQ Command Set for MR Image Storage, AffectedSOPInstanceUID as raw bytes."""
    return encode_command(
        {
            0x00000002: b"1.2.840.10008.5.1.4.1.1.4\x00",
            0x00000100: struct.pack("<H", 0x0001),
            0x00000110: struct.pack("<H", message_id),
            0x00000700: struct.pack("<H", 0),
            0x00000800: struct.pack("<H", 0x0000),
            0x00001000: affected + b"\x00" * (len(affected) % 2),
        }
    )


def fresh(run: Run, good: bool) -> tuple[pydicom.Dataset, bytes]:
    """MR_small with new UIDs: (dataset, its bytes as sent); remembered as good or refused."""
    ds = deepcopy(mr_small())
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid())
    if good:
        run.good[ds.SOPInstanceUID] = ds.StudyInstanceUID
    else:
        run.refused_studies.add(ds.StudyInstanceUID)
    return ds, seeds.dataset_bytes(ds)


def still_serves(run: Run, folder: Path) -> None:
    """A C-ECHO and a well-formed C-STORE from dcmtk both succeed."""
    assert echoscu("127.0.0.1", run.app.port, called_ae=AE_TITLE)
    ds, _ = fresh(run, good=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    storescu([path], "127.0.0.1", run.app.port, called_ae=AE_TITLE)  # raises unless success


def associated(payload: bytes) -> bytes:
    return seeds.associate_rq() + payload


def statuses(answer: bytes) -> list[int]:
    return [int(ds.Status) for ds in responses(answer) if "Status" in ds]


#: A case: (name, bytes to send, check of the answer).
Case = tuple[str, Callable[[Run], bytes], Callable[[bytes], None]]


def ends_with_abort(answer: bytes) -> None:
    types = pdu_types(answer)
    assert types and types[-1] == A_ABORT, types
    assert SUCCESS not in statuses(answer)


def closed_quietly(answer: bytes) -> None:
    """The peer went away mid-PDU: nothing to answer; the connection is closed (bounded)."""
    assert A_ASSOCIATE_AC not in pdu_types(answer)[1:]
    assert SUCCESS not in statuses(answer)


def failure(*codes: int) -> Callable[[bytes], None]:
    def check(answer: bytes) -> None:
        got = statuses(answer)
        assert got and got[0] in codes, [hex(s) for s in got]
        [rsp] = [ds for ds in responses(answer) if int(ds.Status) == got[0]]
        assert str(rsp.get("ErrorComment", "")).strip(), "a failure status says what went wrong"

    return check


def _lying_lengths(run: Run, where: str) -> bytes:
    ds, data = fresh(run, good=False)
    buf = bytearray(data)
    if where == "pixel-data-longer":
        at = buf.rfind(b"\xe0\x7f\x10\x00OW")
        struct.pack_into("<L", buf, at + 8, struct.unpack_from("<L", buf, at + 8)[0] + 4096)
    elif where == "uid-shorter":
        at = buf.find(b"\x20\x00\x0d\x00UI")
        struct.pack_into("<H", buf, at + 6, struct.unpack_from("<H", buf, at + 6)[0] - 3)
    elif where == "cut-mid-element":
        buf = buf[: len(buf) // 2]
    uid = str(ds.SOPInstanceUID).encode()
    return associated(
        pdata(MR_CONTEXT, 0x03, store_rq(uid))
        + pdata(MR_CONTEXT, 0x02, bytes(buf))
        + seeds.release()
    )


def _out_of_order(run: Run) -> bytes:
    ds, data = fresh(run, good=False)
    half = len(data) // 2
    uid = str(ds.SOPInstanceUID).encode()
    return associated(
        pdata(MR_CONTEXT, 0x03, store_rq(uid))
        + pdata(MR_CONTEXT, 0x00, data[half:])  # the second half first
        + pdata(MR_CONTEXT, 0x02, data[:half])
        + seeds.release()
    )


def _hostile(run: Run, keyword: str, value: str) -> bytes:
    ds, _ = fresh(run, good=False)
    data = with_uids(ds, {keyword: value})
    affected = value if keyword == "SOPInstanceUID" else str(ds.SOPInstanceUID)
    return associated(
        pdata(MR_CONTEXT, 0x03, store_rq(affected.encode()))
        + pdata(MR_CONTEXT, 0x02, data)
        + seeds.release()
    )


def _mutated_rq(seed: int) -> bytes:
    rng = random.Random(seed)
    rq = bytearray(seeds.associate_rq())
    for _ in range(rng.randint(1, 8)):
        rq[rng.randrange(6, len(rq))] = rng.randrange(256)  # the variable part
    return bytes(rq)


def answered_the_request(answer: bytes) -> None:
    types = pdu_types(answer)
    assert types and types[0] in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT), types


def cases() -> list[Case]:
    rq = seeds.associate_rq()
    echo_then = seeds.echo()
    found: list[Case] = [
        (f"mutated-rq-{n}", lambda run, n=n: _mutated_rq(n), answered_the_request)
        for n in range(RQ_MUTATIONS)
    ]
    found += [
        ("rq-wrong-called-ae", lambda run: rq.replace(b"SCANWATCH", b"SOMEBODY!"), rejected),
        ("first-pdu-not-a-request", lambda run: pdata(1, 0x03, b"x"), ends_with_abort),
        (
            "rq-length-past-the-data",
            lambda run: rq[:2] + b"\x00\x00\x40\x00" + rq[6:],
            closed_quietly,
        ),
        ("rq-length-4-gib", lambda run: rq[:2] + b"\xff\xff\xff\xff" + rq[6:], ends_with_abort),
        ("rq-too-short", lambda run: b"\x01\x00\x00\x00\x00\x0a" + bytes(10), ends_with_abort),
        (
            "pdata-length-4-gib",
            lambda run: associated(b"\x04\x00\xff\xff\xff\xff"),
            ends_with_abort,
        ),
        (
            "pdata-shorter-than-its-pdv",
            lambda run: associated(
                b"\x04\x00\x00\x00\x00\x0a" + struct.pack(">LBB", 100, 1, 3) + bytes(200)
            ),
            ends_with_abort,
        ),
        (
            "pdata-unknown-context",
            lambda run: associated(pdata(7, 0x03, b"x" * 8)),
            ends_with_abort,
        ),
        (
            "pdata-refused-context",
            lambda run: associated(pdata(5, 0x03, b"x" * 8)),
            ends_with_abort,
        ),
        (
            "store-on-verification-context",
            lambda run: associated(pdata(1, 0x03, store_rq(b"1.2.3"))),
            ends_with_abort,
        ),
        (
            "dataset-before-command",
            lambda run: associated(pdata(MR_CONTEXT, 0x02, b"\x08\x00" * 8)),
            ends_with_abort,
        ),
        (
            "dataset-on-another-context",
            lambda run: associated(
                pdata(MR_CONTEXT, 0x03, store_rq(b"1.2.3")) + pdata(1, 0x02, b"\x08\x00")
            ),
            ends_with_abort,
        ),
        (
            "release-rq-4-gib",
            lambda run: associated(b"\x05\x00\xff\xff\xff\xff" + bytes(4)),
            ends_with_abort,
        ),
        (
            "fragments-out-of-order",
            _out_of_order,
            failure(
                CANNOT_UNDERSTAND_UNDECODABLE,
                CANNOT_UNDERSTAND_TRUNCATED,
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                CANNOT_UNDERSTAND_INVALID_UID,
                0xC220,
                0xC222,
            ),
        ),
        (
            "pixel-data-longer",
            lambda run: _lying_lengths(run, "pixel-data-longer"),
            failure(CANNOT_UNDERSTAND_TRUNCATED),
        ),
        (
            "uid-shorter",
            lambda run: _lying_lengths(run, "uid-shorter"),
            failure(
                CANNOT_UNDERSTAND_UNDECODABLE,
                CANNOT_UNDERSTAND_TRUNCATED,
                CANNOT_UNDERSTAND_INVALID_UID,
            ),
        ),
        (
            "cut-mid-element",
            lambda run: _lying_lengths(run, "cut-mid-element"),
            failure(CANNOT_UNDERSTAND_TRUNCATED),
        ),
        ("disconnect-after-rq", lambda run: rq, closed_quietly),
        (
            "disconnect-mid-command",
            lambda run: associated(pdata(MR_CONTEXT, 0x03, store_rq(b"1.2.3"))[:20]),
            closed_quietly,
        ),
        (
            "disconnect-mid-dataset",
            lambda run: associated(
                pdata(MR_CONTEXT, 0x03, store_rq(b"1.2.3"))
                + pdata(MR_CONTEXT, 0x02, bytes(4000))[:1000]
            ),
            closed_quietly,
        ),
        ("echo-then-abort", lambda run: associated(echo_then + seeds.abort()), lambda a: None),
    ]
    for name, value in hostile_uids().items():
        if name == "leading-zero":
            continue  # accepted on purpose (test_hostile_uids.py)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            found.append(
                (
                    f"uid-{name}-{keyword}",
                    lambda run, k=keyword, v=value: _hostile(run, k, v),
                    _names(keyword),
                )
            )
    return found


def rejected(answer: bytes) -> None:
    assert pdu_types(answer) == [A_ASSOCIATE_RJ]


def _names(keyword: str) -> Callable[[bytes], None]:
    def check(answer: bytes) -> None:
        [rsp] = responses(answer)
        assert int(rsp.Status) == CANNOT_UNDERSTAND_INVALID_UID
        assert str(rsp.ErrorComment).strip() == f"{keyword} is not a valid UID"
        assert (
            "AffectedSOPInstanceUID" not in rsp
            or pydicom.uid.UID(rsp.AffectedSOPInstanceUID).is_valid
        )

    return check


CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_and_the_listener_still_serves(
    case: Case, run: Run, tmp_path: Path
) -> None:
    name, make, check = case
    answer = exchange(run.app.port, make(run))
    check(answer)
    still_serves(run, tmp_path)


def test_only_the_well_formed_instances_were_stored_and_announced(
    run: Run, kafka: LocalKafka, tmp_path: Path
) -> None:
    """After the cases above (pytest runs them first, in the file's order): the layout holds
    the instances dcmtk sent after each case, nothing of the refused ones."""
    still_serves(run, tmp_path)  # at least one, should this test run alone
    root = run.app.settings.storage_dir
    stored = {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }
    assert {(p.parts[0], p.stem) for p in stored} == {(st, sop) for sop, st in run.good.items()}
    assert all(p.suffix == ".dcm" and len(p.parts) == 3 for p in stored)

    # Only the empty files made ready for later C-STOREs are left of what was received, once
    # the settler removed the incoming names of the placed files (every 250 ms).
    def only_ready_files_left() -> bool:
        left = [p for p in (root / ".incoming").rglob("*") if p.is_file()]
        return all(p.parent == run.app.store.ready and p.stat().st_size == 0 for p in left)

    assert wait_for(only_ready_files_left, timeout=10)
    assert {p.name for p in run.base.iterdir()} == {"store"}
    assert not ESCAPED.exists()
    events = received_events(
        kafka.bootstrap_servers,
        set(run.good.values()) | run.refused_studies,
        expected=len(run.good),
    )
    assert sorted(e.SOPInstanceUID for _, e, _ in events) == sorted(run.good)
