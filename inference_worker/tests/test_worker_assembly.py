"""Study assembly: de-duplication, quiet period, maximum wait, parking, announcements."""

from __future__ import annotations

import json

from inference_worker.assembly import (
    ACQUISITION_NUMBER,
    HOLD,
    IMAGES_IN_ACQUISITION,
    NOW,
    NUMBER_OF_FRAMES,
    add_instance,
    add_step,
    header_complete,
    is_ready,
    mark_announced,
    missing,
    park,
    ready_event,
    step_verdict,
)
from inference_worker.config import Settings
from schemas import InstanceReceivedV1, ProcedureStepV1, StepInstanceRef

STUDY = "1.2.826.0.1.3680043.8.498.7"
QUIET, MAX_WAIT = 5.0, 60.0


def received(
    n: int, source: str = "MR1", sha: str = "ab", study: str = STUDY
) -> InstanceReceivedV1:
    """Instance ``n`` of ``study``'s one series, as the listener announces it (the worker's
    tests build their events with it)."""
    return InstanceReceivedV1(
        StudyInstanceUID=study,
        SeriesInstanceUID=study + ".1",
        SOPInstanceUID=f"{study}.1.{n}",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
        TransferSyntaxUID="1.2.840.10008.1.2.1",
        Modality="MR",
        storage_uri=f"file:///s/{n}.dcm",
        size_bytes=1,
        sha256=sha * 32,
        calling_ae_title=source,
        called_ae_title="SCANWATCH",
    )


def ready(state, now):
    return is_ready(state, now, QUIET, MAX_WAIT)


def test_study_is_ready_only_after_the_quiet_period():
    state = add_instance(None, received(1), now=100.0)
    state = add_instance(state, received(2), now=101.0)
    assert not ready(state, now=105.9)
    assert ready(state, now=106.0)


def test_redelivered_instance_neither_duplicates_nor_extends_the_quiet_period():
    state = add_instance(None, received(1), now=100.0)
    state = add_instance(state, received(1), now=104.0)
    assert len(state["instances"]) == 1
    assert state["last_received_at"] == 100.0


def test_new_version_of_an_instance_makes_the_study_due_again():
    state = add_instance(None, received(1), now=0.0)
    state = mark_announced(state, 1)
    assert not ready(state, now=100.0)
    state = add_instance(state, received(1, sha="cd"), now=100.0)  # same SOP, other bytes
    assert len(state["instances"]) == 1
    assert state["instances"][f"{STUDY}.1.1"]["sha256"] == "cd" * 32
    assert not ready(state, now=104.0)  # a new quiet period started
    assert ready(state, now=105.0)


def test_announced_study_waits_for_new_instances():
    state = add_instance(add_instance(None, received(1), 0.0), received(2), 0.0)
    event = ready_event(STUDY, state, quiet_period_s=QUIET)
    assert {i.SOPInstanceUID for i in event.instances} == {f"{STUDY}.1.1", f"{STUDY}.1.2"}
    state = mark_announced(state, len(event.instances))
    assert not ready(state, now=100.0)
    state = add_instance(state, received(3), now=100.0)  # a late instance
    assert ready(state, now=105.0)
    assert len(ready_event(STUDY, state, QUIET).instances) == 3


def test_a_study_that_never_goes_quiet_is_scored_after_the_maximum_wait():
    state = None
    for n in range(70):  # one instance a second, for longer than the maximum wait
        state = add_instance(state, received(n), now=float(n))
        if ready(state, now=float(n)):
            break
    assert n == MAX_WAIT
    # Once taken up, the clock restarts from the announcement, not from the first instance.
    state = mark_announced(state, len(state["instances"]))
    state = add_instance(state, received(100), now=float(n + 1))
    assert not ready(state, now=float(n + 2))
    assert ready(state, now=float(n) + MAX_WAIT)


def test_parked_study_is_announced_again_after_parking():
    state = add_instance(None, received(1), 0.0)
    state = mark_announced(state, 1)
    state = park(state, until=100.0)
    assert not ready(state, now=99.0)
    assert ready(state, now=100.0)
    # Taking it up again clears the parking.
    assert mark_announced(state, 1)["parked_until"] == 0.0


def test_quiet_period_per_source():
    settings = Settings(quiet_period_s=5, quiet_period_by_source={"SLOW-PACS": 30})
    assert settings.quiet_period_for("SLOW-PACS") == 30
    assert settings.quiet_period_for("MR1") == 5
    state = add_instance(None, received(1, source="SLOW-PACS"), 0.0)
    assert state["source"] == "SLOW-PACS"


def test_state_is_json_serialisable_and_old_states_still_work():
    state = add_instance(None, received(1), 0.0)
    assert json.loads(json.dumps(state)) == state
    old = {k: v for k, v in state.items() if k not in ("source",)}  # written before "source"
    assert ready(old, now=QUIET)


def test_a_partition_not_read_up_to_the_quiet_period_holds_the_study():
    """A lagging worker: whatever its own clock says, the study waits until its partition has
    been read past the study's last event plus the quiet period (``caught_up``)."""
    state = add_instance(None, received(1), now=100.0)
    assert not is_ready(state, 10_000.0, QUIET, MAX_WAIT, caught_up=False)
    assert is_ready(state, 10_000.0, QUIET, MAX_WAIT, caught_up=True)


def test_the_quiet_period_counts_from_the_listeners_event_time_once_caught_up():
    event = received(1)
    at = event.occurred_at.timestamp()
    state = add_instance(None, event, now=at + 60.0)  # read a minute after the listener took it
    assert state["last_event_at"] == at
    assert is_ready(state, at + QUIET, QUIET, MAX_WAIT, caught_up=True)
    assert not is_ready(state, at + QUIET - 0.1, QUIET, MAX_WAIT, caught_up=True)
    # Not known (nothing read from the partition yet): the worker's own clock, as before.
    assert not is_ready(state, at + QUIET, QUIET, MAX_WAIT, caught_up=None)
    assert is_ready(state, at + 60.0 + QUIET, QUIET, MAX_WAIT, caught_up=None)


def test_an_instance_published_late_counts_its_quiet_period_from_its_publication():
    """A listener whose outbox fell behind publishes an instance accepted long ago: counted
    from acceptance its quiet period would be over on arrival, and the study released while
    its next instances still wait in the outbox. Its record's timestamp is the later time."""
    event = received(1)
    accepted = event.occurred_at.timestamp()
    published = accepted + 40.0  # Kafka was unreachable for 40 s
    state = add_instance(None, event, now=published + 0.01, published_at=published)
    assert state["last_event_at"] == published
    assert not is_ready(state, published + QUIET - 0.1, QUIET, MAX_WAIT, caught_up=True)
    assert is_ready(state, published + QUIET, QUIET, MAX_WAIT, caught_up=True)
    # A record stamped before the instance was accepted (another clock): acceptance counts.
    early = add_instance(None, event, now=accepted, published_at=accepted - 3.0)
    assert early["last_event_at"] == accepted


def step(status: str, numbers: tuple[int, ...] = (), studies: tuple[str, ...] = (STUDY,)):
    """A procedure step (MPPS) event of ``STUDY`` naming instances ``numbers``."""
    return ProcedureStepV1(
        StudyInstanceUID=STUDY,
        procedure_step_uid="1.2.3.4",
        status=status,
        step_studies=list(studies),
        instances=[
            StepInstanceRef(SeriesInstanceUID=STUDY + ".1", SOPInstanceUID=f"{STUDY}.1.{n}")
            for n in numbers
        ],
        calling_ae_title="MR1",
    )


def test_a_completed_step_releases_its_study_once_every_instance_it_names_arrived():
    state = add_step(None, step("IN PROGRESS"), now=90.0)
    state = add_instance(state, received(1), now=100.0)
    assert state["first_received_at"] == 100.0  # the study's first instance, not the step
    assert not ready(state, now=150.0)  # in progress: the quiet period does not release it
    state = add_step(state, step("COMPLETED", (1, 2)), now=150.0)
    assert step_verdict(state) == HOLD and missing(state) == 1
    assert not ready(state, now=150.0)
    state = add_instance(state, received(2), now=151.0)
    assert step_verdict(state) == NOW
    assert ready(state, now=151.0)  # no quiet period
    state = mark_announced(state, 2)
    state = add_instance(state, received(3), now=300.0)  # after the step: the quiet period
    assert step_verdict(state) is None
    assert not ready(state, now=304.9) and ready(state, now=305.0)


def test_a_step_whose_instance_never_arrives_holds_its_study_until_the_maximum_wait():
    state = add_instance(None, received(1), now=100.0)
    state = add_step(state, step("COMPLETED", (1, 2)), now=101.0)
    assert not ready(state, now=100.0 + MAX_WAIT - 0.1)
    assert ready(state, now=100.0 + MAX_WAIT)
    assert missing(state) == 1


def test_a_discontinued_step_releases_at_once_and_a_final_step_is_not_reopened():
    state = add_instance(None, received(1), now=100.0)
    state = add_step(state, step("DISCONTINUED"), now=100.5)
    assert ready(state, now=100.5)
    assert add_step(state, step("IN PROGRESS"), now=101.0) == state  # redelivered, read late


def test_a_step_naming_several_studies_leaves_the_quiet_period_to_decide():
    state = add_instance(None, received(1), now=100.0)
    state = add_step(state, step("COMPLETED", (1,), studies=(STUDY, "1.2.9")), now=100.0)
    assert step_verdict(state) is None
    assert not ready(state, now=104.9) and ready(state, now=105.0)


def counts(images: int, acquisition: int | None = 1, frames: int | None = None) -> dict:
    """An instance event's Kafka headers with its counts, as the listener sends them."""
    headers = {IMAGES_IN_ACQUISITION: str(images).encode()}
    if acquisition is not None:
        headers[ACQUISITION_NUMBER] = str(acquisition).encode()
    if frames is not None:
        headers[NUMBER_OF_FRAMES] = str(frames).encode()
    return headers


def test_a_trusted_sender_s_series_is_complete_when_its_acquisition_count_arrived():
    state = add_instance(None, received(1), now=100.0, headers=counts(2))
    assert not header_complete(state)
    assert not is_ready(state, 100.0, QUIET, MAX_WAIT, trust_headers=True)
    state = add_instance(state, received(2), now=100.5, headers=counts(2))
    assert header_complete(state)
    assert is_ready(state, 100.5, QUIET, MAX_WAIT, trust_headers=True)  # no quiet period
    assert not ready(state, now=100.5)  # a sender not trusted on its counts waits it out
    state = add_instance(state, received(3), now=101.0, headers=counts(2))
    assert not header_complete(state)  # three where the header says two: the counts are wrong


def test_counts_missing_on_one_instance_leave_the_quiet_period_to_decide():
    state = add_instance(None, received(1), now=100.0, headers=counts(2))
    state = add_instance(state, received(2), now=100.0)
    assert not header_complete(state)


def test_an_enhanced_mr_instance_is_its_whole_series():
    state = add_instance(None, received(1), now=100.0, headers={NUMBER_OF_FRAMES: b"120"})
    assert header_complete(state)


def test_an_exam_in_progress_is_held_past_the_maximum_wait_while_instances_keep_coming():
    """An exam longer than the maximum wait is not scored in the middle: it is held while its
    step is IN PROGRESS and instances keep arriving, then released by its completion, by
    silence as long as the maximum wait, or by the exam's own maximum."""
    exam_max = 10 * MAX_WAIT

    def ready_in_exam(state, now):
        return is_ready(state, now, QUIET, MAX_WAIT, exam_max_wait_s=exam_max)

    state = add_step(None, step("IN PROGRESS"), now=0.0)
    for n in range(1, 6):  # an instance every half maximum wait, for 2.5 maximum waits
        state = add_instance(state, received(n), now=n * MAX_WAIT / 2)
        assert not ready_in_exam(state, now=n * MAX_WAIT / 2 + MAX_WAIT / 2 - 0.1)
    last = 5 * MAX_WAIT / 2
    assert not ready_in_exam(state, now=last + MAX_WAIT - 0.1)
    assert ready_in_exam(state, now=last + MAX_WAIT)  # silent as long as the maximum wait
    completed = add_step(state, step("COMPLETED", tuple(range(1, 6))), now=last + 1.0)
    assert ready_in_exam(completed, now=last + 1.0)
    # Instances that never stop: released at the exam's maximum after the first.
    for n in range(6, 21):  # to 10 maximum waits, never silent for one
        state = add_instance(state, received(n), now=n * MAX_WAIT / 2)
    first = state["first_received_at"]
    assert not ready_in_exam(state, now=first + exam_max - 0.1)
    assert ready_in_exam(state, now=first + exam_max)
    assert Settings().exam_max_wait_s == 4 * 3600.0
