"""Corpus test: every file of pydicom's bundled test files and of the ``pydicom-data`` wheel is
sent with dcmtk ``storescu`` to a listener that accepts every storage class. Each one is either
stored byte-exact (checked against the bytes captured on the wire) with its event on Kafka, or
refused with a reason this test re-derives from the file on its own."""

from __future__ import annotations

import hashlib
import subprocess
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from devtools.kafka_local import LocalKafka
from devtools.peers import dcmtk_env
from dicom_listener import handlers as h
from dicom_listener.dicom import statuses
from dicom_listener.sop_classes import TRANSFER_SYNTAXES, all_storage_classes
from dicom_listener.tests.conftest import split_part10
from dicom_listener.tests.helpers import WireTap, received_events
from dicom_listener.tests.test_listener_integration import AE_TITLE, start_listener

pytestmark = pytest.mark.integration

pydicom_data = pytest.importorskip("data_store", reason="the pydicom-data wheel is not installed")

CORPUS_DIRS = (
    Path(pydicom.data.__file__).parent / "test_files",
    Path(pydicom_data.__file__).parent / "data",
)
#: storescu option that proposes the file's own transfer syntax first, so that it sends the
#: file's encoding instead of converting it.
TS_OPTION = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGLosslessSV1: "-xs",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
}


@dataclass
class Outcome:
    path: Path
    output: str
    wire: list[bytes]
    statuses: list[int]

    @property
    def storescu_could_not_read(self) -> bool:
        return any(
            text in self.output
            for text in (
                "Bad DICOM file",
                "No SOP Class or Instance UID",
                "missing SOP class (or instance)",
                "Invalid stream",
            )
        )

    @property
    def refused_at_negotiation(self) -> bool:
        return any(
            text in self.output
            for text in ("No presentation context for", "No Acceptable Presentation Contexts")
        )

    @property
    def status(self) -> int | None:
        """The C-STORE response status captured on the wire."""
        return self.statuses[-1] if self.statuses else None


def corpus() -> list[Path]:
    return sorted(p for d in CORPUS_DIRS for p in d.rglob("*") if p.is_file())


def header(path: Path) -> pydicom.Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM at all
            return None


def send(path: Path, port: int) -> Outcome:
    ds = header(path)
    ts = ds.file_meta.get("TransferSyntaxUID") if ds is not None else None
    options = ["-R", *([TS_OPTION[ts]] if ts in TS_OPTION else [])]
    tap = WireTap(("127.0.0.1", port))
    result = subprocess.run(
        ["storescu", "-v", *options, "-aec", AE_TITLE, "127.0.0.1", str(tap.port), str(path)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    wire = tap.datasets()
    return Outcome(path, result.stdout + result.stderr, wire, tap.statuses())


def justified(outcome: Outcome, accepted: set[str]) -> str | None:
    """Why the listener's answer is right, derived from the file; None when it is not."""
    ds = header(outcome.path)
    status = outcome.status
    if outcome.refused_at_negotiation:
        if ds is None:
            return None
        sop_class = str(ds.get("SOPClassUID", ""))
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if sop_class not in accepted:
            return f"SOP class {sop_class} not accepted"
        if ts not in TRANSFER_SYNTAXES:
            return f"transfer syntax {ts} not accepted"
        return None
    [wire] = outcome.wire
    if status == statuses.CANNOT_UNDERSTAND_TRUNCATED:
        declared = max(
            (e.value_tell + e.length for e in ds._dict.values() if e.length != 0xFFFFFFFF),
            default=0,
        ) if ds is not None else 0  # fmt: skip
        return "truncated" if declared > outcome.path.stat().st_size else None
    if status in (statuses.CANNOT_UNDERSTAND_MISSING_UID, statuses.CANNOT_UNDERSTAND_INVALID_UID):
        values = [str(ds.get(k, "") or "") for k in h.REQUIRED_UIDS] if ds else [""]
        bad = [v for v in values if not v or not pydicom.uid.UID(v).is_valid]
        return "missing or invalid UID" if bad else None
    if status == statuses.CANNOT_UNDERSTAND_UNDECODABLE:
        return "undecodable"
    return None


def test_every_corpus_file_is_stored_byte_exact_or_refused_for_a_stated_reason(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    accepted = {str(uid) for uid in all_storage_classes()}
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        sop_classes="ALL_STORAGE",
        max_pdu_size=0,
    )
    try:
        files = corpus()
        assert len(files) > 200, "corpus not found"
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda p: send(p, app.port), files))
    finally:
        app.stop()

    # Stored files by the SHA-256 of their dataset (what travelled in the C-STORE).
    stored = {
        hashlib.sha256(split_part10(p.read_bytes())[1]).hexdigest(): p
        for p in app.settings.storage_dir.glob("*/*/*.dcm")
    }
    tally: Counter[str] = Counter()
    wrong: list[str] = []
    expected_hashes: set[str] = set()
    for outcome in outcomes:
        name = outcome.path.name
        if outcome.storescu_could_not_read:
            assert outcome.wire == [], name
            tally["not sendable: storescu cannot read it"] += 1
        elif outcome.status == statuses.SUCCESS:
            [wire] = outcome.wire
            path = stored.get(hashlib.sha256(wire).hexdigest())
            if path is None:
                wrong.append(f"{name}: success but no stored file holds the bytes sent")
            else:
                expected_hashes.add(hashlib.sha256(path.read_bytes()).hexdigest())
            tally["stored byte-exact"] += 1
        else:
            reason = justified(outcome, accepted)
            if reason is None:
                wrong.append(
                    f"{name}: status {outcome.status} without a reason: {outcome.output[-300:]}"
                )
            else:
                tally[f"refused: {reason}"] += 1
    assert not wrong, "\n".join(wrong)
    assert tally["stored byte-exact"] > 150, tally

    events = received_events(kafka.bootstrap_servers, _studies(stored), expected=len(stored))
    published = {e.sha256 for _, e, _ in events}
    assert expected_hashes <= published, "every stored instance's event reaches Kafka"
    print(dict(tally))  # noqa: T201 - the corpus summary is the point of this test's output


def _studies(stored: dict[str, Path]) -> set[str]:
    return {p.parent.parent.name for p in stored.values()}


def test_default_listener_refuses_non_mr_classes_at_negotiation(
    kafka: LocalKafka, tmp_path: Path
) -> None:
    app = start_listener(tmp_path, kafka_bootstrap_servers=kafka.bootstrap_servers)
    try:
        test_files = CORPUS_DIRS[0]
        ct, mr = (
            send(test_files / "CT_small.dcm", app.port),
            send(test_files / "MR_small.dcm", app.port),
        )
    finally:
        app.stop()
    assert ct.refused_at_negotiation and ct.wire == []
    assert mr.status == statuses.SUCCESS
