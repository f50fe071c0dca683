"""The fuzz targets (``dicom_listener/fuzz``): every seed and every kept finding replayed
in-process, and each target run for a few seconds under atheris (coverage-guided, seeded),
starting from the committed corpus. The long run is ``bench/fuzz_listener.py``."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dicom_listener.dicom.association import Association
from dicom_listener.dicom.pdu import A_ABORT, A_ASSOCIATE_AC, ProtocolError
from dicom_listener.fuzz import seeds, targets
from dicom_listener.fuzz.targets import TARGETS, WireSocket

FUZZ = Path(targets.__file__).parent
REGRESSIONS = sorted((FUZZ / "regressions").glob("*/*.bin"))
ROOT = FUZZ.parent.parent
#: Inputs run per target under atheris in the test suite (the committed corpus included; about
#: 40 s in all): a check that each target runs from its corpus, and a count, not a time, so that
#: a finding in CI is the same run here (same ``-seed``). The long run that looks for findings
#: is ``bench/fuzz_listener.py`` (5 minutes a target).
RUNS = {
    "association": 4000,
    "pdata": 4000,
    "scan": 8000,
    "store": 400,
    "command": 3000,
    "file_meta": 3000,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_kept_finding_is_handled(path: Path) -> None:
    """Each file is an input that once broke its target (or an oracle corner, named after
    it): the target must now pass it."""
    TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", TARGETS)
def test_every_seed_passes_its_target(name: str) -> None:
    for data in seeds.seeds(name):
        TARGETS[name](data)


def serve(data: bytes) -> tuple[list[int], Exception | None]:
    """Serve ``data`` as a peer's bytes: the PDU types answered, and how it ended."""
    sock = WireSocket(data)
    assoc = Association(
        sock,  # type: ignore[arg-type]
        "127.0.0.1",
        targets._server_config(),
        targets._policy().check,
        lambda received: targets._check_received(received, []),
        threading.BoundedSemaphore(1),
        lambda reason: None,
    )
    ended: Exception | None = None
    try:
        assoc.serve()
    except (ProtocolError, ConnectionError) as exc:
        ended = exc
    return targets._check_answers(bytes(sock.sent)), ended


def test_a_release_request_of_4_gib_is_aborted_not_read() -> None:
    """An A-RELEASE-RQ is 4 bytes (PS3.8 9.3.6); one claiming 4 GiB was read into a buffer
    of that size."""
    release = (FUZZ / "regressions" / "pdata" / "release-rq-of-4-gib.bin").read_bytes()
    kinds, ended = serve(seeds.associate_rq() + release)
    assert kinds == [A_ASSOCIATE_AC, A_ABORT]
    assert isinstance(ended, ProtocolError) and "A-RELEASE-RQ" in str(ended)


def test_an_association_request_that_does_not_parse_is_aborted() -> None:
    rq = seeds.associate_rq()
    kinds, ended = serve(rq[:6] + rq[6:40])  # header says more than the 34 bytes that follow
    assert ended is not None and kinds == []  # the peer closed first: no one to tell
    short = bytes([0x01, 0]) + (10).to_bytes(4, "big") + bytes(10)
    kinds, ended = serve(short)
    assert isinstance(ended, ProtocolError) and kinds == [A_ABORT]


@pytest.mark.integration  # a libFuzzer process of its own, for seconds
@pytest.mark.parametrize("name", TARGETS)
def test_a_short_coverage_guided_run_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    committed = FUZZ / "corpus" / name
    for n, path in enumerate(sorted(committed.glob("*")) if committed.is_dir() else []):
        (corpus / f"committed-{n:05d}").write_bytes(path.read_bytes())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_listener.fuzz",
            name,
            str(corpus),
            f"-runs={RUNS[name]}",
            "-seed=1",
            "-timeout=30",  # a hang; generous: a loaded machine starves a process for seconds
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    artifacts = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    # What CI prints must be enough to replay the finding here: the exception and the input.
    found = run.stderr.find("=== Uncaught Python exception")
    report = "\n".join(
        [
            run.stderr[found : found + 3000] if found >= 0 else run.stderr[-3000:],
            *(
                f"{p.name} (base64): {base64.b64encode(p.read_bytes()[:4096]).decode()}"
                for p in artifacts
            ),
        ]
    )
    assert run.returncode == 0 and not artifacts, report
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", run.stderr)
    assert runs is not None and int(runs.group(1)) >= RUNS[name], report
