"""Study assembly: de-duplication, quiet period, announcements."""

from __future__ import annotations

from inference_worker.assembly import add_instance, is_ready, mark_announced, ready_event
from schemas import InstanceReceivedV1

STUDY = "1.2.826.0.1.3680043.8.498.7"


def received(n: int, sha: str = "ab") -> InstanceReceivedV1:
    return InstanceReceivedV1(
        StudyInstanceUID=STUDY,
        SeriesInstanceUID=STUDY + ".1",
        SOPInstanceUID=f"{STUDY}.1.{n}",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
        TransferSyntaxUID="1.2.840.10008.1.2.1",
        Modality="MR",
        storage_uri=f"file:///s/{n}.dcm",
        size_bytes=1,
        sha256=sha * 32,
        calling_ae_title="A",
        called_ae_title="SCANWATCH",
    )


def test_study_is_ready_only_after_the_quiet_period():
    state = add_instance(None, received(1), now=100.0)
    state = add_instance(state, received(2), now=101.0)
    assert not is_ready(state, now=105.9, quiet_period_s=5)
    assert is_ready(state, now=106.0, quiet_period_s=5)


def test_redelivered_instance_neither_duplicates_nor_extends_the_quiet_period():
    state = add_instance(None, received(1), now=100.0)
    state = add_instance(state, received(1), now=104.0)
    assert len(state["instances"]) == 1
    assert state["last_received_at"] == 100.0


def test_announced_study_waits_for_new_instances():
    state = add_instance(add_instance(None, received(1), 0.0), received(2), 0.0)
    event = ready_event(STUDY, state, quiet_period_s=5)
    assert {i.SOPInstanceUID for i in event.instances} == {f"{STUDY}.1.1", f"{STUDY}.1.2"}
    state = mark_announced(state, len(event.instances))
    assert not is_ready(state, now=100.0, quiet_period_s=5)
    state = add_instance(state, received(3), now=100.0)  # a late instance
    assert is_ready(state, now=105.0, quiet_period_s=5)
    assert len(ready_event(STUDY, state, 5).instances) == 3


def test_state_is_json_serialisable():
    import json

    state = add_instance(None, received(1), 0.0)
    assert json.loads(json.dumps(state)) == state
