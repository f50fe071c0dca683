"""Study assembly: which instances belong to a study, and when the study is ready.

Plain functions over a JSON-able state dict (it lives in a Faust table, whose changelog makes it
survive restarts). A study is ready when it has instances that were not yet announced and either
no new instance arrived for the quiet period of its source, or the maximum wait since its first
(or last announced) instance has passed. A parked study (model server unreachable for longer
than the retries) becomes ready again when its parking time is over.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NotRequired, TypedDict

from schemas import InstanceReceivedV1, InstanceRef, StudyReadyV1


class StudyState(TypedDict):
    """What the worker remembers about one study (the table value)."""

    instances: dict[str, dict]  # SOPInstanceUID -> InstanceRef as JSON
    first_received_at: float  # epoch seconds
    last_received_at: float
    announced: int  # number of instances in the last ready event scored
    source: NotRequired[str]  # calling AE title of the first instance
    announced_at: NotRequired[float]  # when the last ready event was taken up for scoring
    parked_until: NotRequired[float]  # scoring failed transiently: not before this time


def add_instance(state: StudyState | None, event: InstanceReceivedV1, now: float) -> StudyState:
    """Record an instance; a redelivered or re-sent instance (same SOPInstanceUID) is a no-op
    except for keeping its latest storage reference."""
    if state is None:
        state = StudyState(
            instances={},
            first_received_at=now,
            last_received_at=now,
            announced=0,
            source=event.calling_ae_title,
        )
    instances = dict(state["instances"])
    known = event.SOPInstanceUID in instances
    instances[event.SOPInstanceUID] = event.ref().model_dump(mode="json")
    return StudyState(
        **{
            **state,
            "instances": instances,
            "last_received_at": state["last_received_at"] if known else now,
        }
    )


def is_ready(state: StudyState, now: float, quiet_period_s: float, max_wait_s: float) -> bool:
    """True when some instances were never announced and the study is quiet (or waited enough)."""
    if len(state["instances"]) <= state["announced"] or now < state.get("parked_until", 0.0):
        return False
    if now - state["last_received_at"] >= quiet_period_s:
        return True
    waiting_since = max(state["first_received_at"], state.get("announced_at", 0.0))
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


def mark_announced(state: StudyState, count: int, now: float) -> StudyState:
    """Remember that a ready event with ``count`` instances was taken up for scoring."""
    return StudyState(
        **{
            **state,
            "announced": max(state["announced"], count),
            "announced_at": now,
            "parked_until": 0.0,
        }
    )


def park(state: StudyState, until: float) -> StudyState:
    """Scoring failed transiently beyond its retries: announce the study again at ``until``."""
    return StudyState(**{**state, "announced": 0, "parked_until": until})
