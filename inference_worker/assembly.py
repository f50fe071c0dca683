"""Study assembly: which instances belong to a study, and when the study is ready.

Plain functions over a JSON-able state dict (it lives in a Faust table, whose changelog makes it
survive restarts). A study is ready when it has instances that were not yet announced and either
no new instance arrived for the quiet period of its source, or the maximum wait since the oldest
instance not yet announced has passed. A parked study (model server unreachable for longer
than the retries) becomes ready again when its parking time is over.
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
    if len(state["instances"]) <= state["announced"]:
        updated["pending_since"] = now  # the first change since the last announcement
    if previous is not None:
        updated["announced"] = 0  # same count, other content: announce the study again
    return updated


def is_ready(state: StudyState, now: float, quiet_period_s: float, max_wait_s: float) -> bool:
    """True when some instances were never announced and the study is quiet (or waited enough)."""
    if len(state["instances"]) <= state["announced"] or now < state.get("parked_until", 0.0):
        return False
    if now - state["last_received_at"] >= quiet_period_s:
        return True
    waiting_since = state.get("pending_since", state["first_received_at"])
    return now - waiting_since >= max_wait_s


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
