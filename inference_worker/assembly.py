"""Study assembly: which instances belong to a study, and when the study is ready.

Plain functions over a JSON-able state dict (it lives in a Faust table, whose changelog makes it
survive restarts). A study is ready when it has instances that were not yet announced and either
no new instance arrived for the quiet period of its source, or the maximum wait since the oldest
instance not yet announced has passed. A parked study (model server unreachable for longer
than the retries) becomes ready again when its parking time is over.

The quiet period is counted from the listener's event time (``occurred_at``: when it accepted
the instance), and only once the worker has read every event of the study's partition up to
that time plus the quiet period (``caught_up``): a worker lagging behind its partition would
otherwise count the quiet period while the study's last instances still wait unread, release
the study on part of its slices and score it again later. Where that is not known (nothing read
from the partition since it was assigned to this worker; a state written before event times were
kept),
the quiet period is counted on the worker's clock from when it read the study's last instance.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict

from schemas import InstanceReceivedV1, InstanceRef, StudyReadyV1


class StudyState(TypedDict):
    """What the worker remembers about one study (the table value)."""

    instances: dict[str, dict[str, Any]]  # SOPInstanceUID -> InstanceRef as JSON
    first_received_at: float  # epoch seconds
    last_received_at: float
    announced: int  # number of instances in the last ready event scored
    source: NotRequired[str]  # calling AE title of the first instance
    pending_since: NotRequired[float]  # arrival of the oldest instance not yet announced
    parked_until: NotRequired[float]  # scoring failed transiently: not before this time
    last_event_at: NotRequired[float]  # the newest instance's occurred_at (listener's clock)


def add_instance(state: StudyState | None, event: InstanceReceivedV1, now: float) -> StudyState:
    """Record an instance.

    A redelivered or re-sent instance (same SOPInstanceUID, same sha256) changes nothing. A new
    version of an instance (same SOPInstanceUID, other bytes: the listener keeps both) replaces
    the reference and makes the whole study due for scoring again.
    """
    if state is None:
        state = StudyState(
            instances={},
            first_received_at=now,
            last_received_at=now,
            announced=0,
            source=event.calling_ae_title,
        )
    previous = state["instances"].get(event.SOPInstanceUID)
    if previous is not None and previous["sha256"] == event.sha256:
        return state
    updated = state.copy()
    updated["instances"] = {
        **state["instances"],
        event.SOPInstanceUID: event.ref().model_dump(mode="json"),
    }
    updated["last_received_at"] = now
    updated["last_event_at"] = max(state.get("last_event_at", 0.0), event.occurred_at.timestamp())
    if len(state["instances"]) <= state["announced"]:
        updated["pending_since"] = now  # the first change since the last announcement
    if previous is not None:
        updated["announced"] = 0  # same count, other content: announce the study again
    return updated


def is_due(state: StudyState, now: float) -> bool:
    """Some instances were never announced, and the study is not parked."""
    return len(state["instances"]) > state["announced"] and now >= state.get("parked_until", 0.0)


def is_ready(
    state: StudyState,
    now: float,
    quiet_period_s: float,
    max_wait_s: float,
    caught_up: bool | None = None,
) -> bool:
    """True when some instances were never announced and the study is quiet (or waited enough).

    ``caught_up``: whether every event of the study's partition up to
    :func:`quiet_until` has been read (None: not known; see the module's docstring)."""
    if not is_due(state, now):
        return False
    waiting_since = state.get("pending_since", state["first_received_at"])
    if caught_up is None or "last_event_at" not in state:
        quiet_since = state["last_received_at"]
    elif not caught_up:
        return False
    else:
        quiet_since = state["last_event_at"]
    return now - quiet_since >= quiet_period_s or now - waiting_since >= max_wait_s


def quiet_until(state: StudyState, quiet_period_s: float) -> float | None:
    """The listener's time up to which the study's partition must have been read before the
    study may be released: its last event's time plus the quiet period (None: not kept)."""
    last = state.get("last_event_at")
    return None if last is None else last + quiet_period_s


def ready_event(study_uid: str, state: StudyState, quiet_period_s: float) -> StudyReadyV1:
    """The ``dicom.study.ready.v1`` event for a study's current state."""
    return StudyReadyV1(
        StudyInstanceUID=study_uid,
        instances=[InstanceRef.model_validate(ref) for ref in state["instances"].values()],
        first_received_at=datetime.fromtimestamp(state["first_received_at"], UTC),
        last_received_at=datetime.fromtimestamp(state["last_received_at"], UTC),
        quiet_period_s=quiet_period_s,
    )


def mark_announced(state: StudyState, count: int) -> StudyState:
    """Remember that a ready event with ``count`` instances was taken up for scoring."""
    return StudyState(**{**state, "announced": max(state["announced"], count), "parked_until": 0.0})


def park(state: StudyState, until: float) -> StudyState:
    """Scoring failed transiently beyond its retries: announce the study again at ``until``."""
    return StudyState(**{**state, "announced": 0, "parked_until": until})
