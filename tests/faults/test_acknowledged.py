"""The fault suite counts an instance as acknowledged only when storescu logged Success for it:
a file whose response never came (the association broke) or came with a failure status is
sent again."""

from __future__ import annotations

from pathlib import Path

from devtools.faults import acknowledged

BROKEN = """\
I: Requesting Association
I: Association Accepted (Max Send PDV: 16372)
I: Sending file: s/MR0001.dcm
I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit
I: Sending Store Request (MsgID 1, MR)
I: Received Store Response (Success)
I: Sending file: s/MR0002.dcm
I: Sending Store Request (MsgID 2, MR)
I: Received Store Response (Out of Resources)
I: Sending file: s/MR0003.dcm
I: Sending Store Request (MsgID 3, MR)
E: Store Failed, file: s/MR0003.dcm:
E: 0006:0317 Peer aborted Association (or never connected)
"""


def test_only_success_responses_count() -> None:
    acked, other = acknowledged(BROKEN)
    assert acked == [Path("s/MR0001.dcm")]
    assert other == ["Out of Resources"]


def test_a_clean_run_acknowledges_every_file() -> None:
    log = "".join(
        f"I: Sending file: s/MR{n:04d}.dcm\nI: Received Store Response (Success)\n"
        for n in range(1, 4)
    )
    assert acknowledged(log)[0] == [Path(f"s/MR{n:04d}.dcm") for n in range(1, 4)]
