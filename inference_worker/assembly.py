"""Study assembly: which instances belong to a study, and when the study is ready.

Plain functions over a JSON-able state dict (it lives in a Faust table, whose changelog makes it
survive restarts). A study is ready when no new instance arrived for the quiet period and it has
instances that were not yet announced.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

from schemas import InstanceReceivedV1, InstanceRef, StudyReadyV1


class StudyState(TypedDict):
    """What the worker remembers about one study (the table value)."""

    instances: dict[str, dict]  # SOPInstanceUID -> InstanceRef as JSON
    first_received_at: float  # epoch seconds
    last_received_at: float
    announced: int  # number of instances in the last ready event


def add_instance(state: StudyState | None, event: InstanceReceivedV1, now: float) -> StudyState:
    """Record an instance; a redelivered or re-sent instance (same SOPInstanceUID) is a no-op
    except for keeping its latest storage reference."""
    if state is None:
        state = StudyState(instances={}, first_received_at=now, last_received_at=now, announced=0)
    instances = dict(state["instances"])
    known = event.SOPInstanceUID in instances
    instances[event.SOPInstanceUID] = event.ref().model_dump(mode="json")
    return StudyState(
        instances=instances,
        first_received_at=state["first_received_at"],
        last_received_at=state["last_received_at"] if known else now,
        announced=state["announced"],
    )


def is_ready(state: StudyState, now: float, quiet_period_s: float) -> bool:
    """True when the quiet period has passed and some instances were never announced."""
    return (
        len(state["instances"]) > state["announced"]
        and now - state["last_received_at"] >= quiet_period_s
    )


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
    """Remember that a ready event with ``count`` instances went out."""
    return StudyState(**{**state, "announced": max(state["announced"], count)})
