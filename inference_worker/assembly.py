"""Study assembly: which instances belong to a study, and when the study is ready.

Plain functions over a JSON-able state dict (it lives in a Faust table, whose changelog makes it
survive restarts). A study is ready when it has instances that were not yet announced and either
no new instance arrived for the quiet period of its source, or the maximum wait since the oldest
instance not yet announced has passed. A parked study (model server unreachable for longer
than the retries) becomes ready again when its parking time is over.

The quiet period is counted from the listener's event time (:func:`event_time`): when it put
the instance's event on Kafka (the record's timestamp), or when it accepted the instance
(``occurred_at``) if that is later or the record has no timestamp. Publication, not
acceptance, because a listener whose outbox fell behind (Kafka unreachable for a while)
publishes long-accepted instances in a burst: counted from acceptance, their quiet period
would be over on arrival, and a study would be released on the first of them while the rest
still wait in the outbox. And only once the worker has read every event of the study's
partition up to that time plus the quiet period (``caught_up``): a worker lagging behind its
partition would otherwise count the quiet period while the study's last instances still wait
unread, release the study on part of its slices and score it again later. Where that is not
known (nothing read from the partition since it was assigned to this worker; a state written
before event times were kept), the quiet period is counted on the worker's clock from when it
read the study's last instance.

A modality that reports Modality Performed Procedure Steps (``dicom.procedure.step.v1``) says
when it is done, so its studies do not wait for the quiet period (:func:`step_verdict`): while a
step is IN PROGRESS the study is held (the quiet timer would otherwise release it between two
series), however long the exam, until no instance has come for the maximum wait (a modality
that never ends its step) or the exam's own maximum (``exam_max_wait_s``); once every step is
final, a COMPLETED step's study is ready as soon as every instance
it references has arrived, and a DISCONTINUED one at once. A referenced instance that never
arrives holds the study until the maximum wait, and is then reported (:func:`missing`). Once a
step's study has been announced, later instances follow the quiet period again.

Without steps, a sender configured as filling them correctly may be trusted on the counts its
instances carry (:func:`header_complete`): a series whose ImagesInAcquisition instances of each
acquisition have all arrived, or an Enhanced MR whose one instance holds every frame, is
complete, and a study whose every series is complete is ready at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, NotRequired, TypedDict

from schemas import InstanceReceivedV1, InstanceRef, ProcedureStepV1, StudyReadyV1

#: :func:`step_verdict`: ready now; held for instances a completed step names, until the
#: maximum wait; or held while the exam is in progress (see :func:`is_ready`).
Verdict = Literal["now", "hold", "examining"]
#: Performed Procedure Step Status values (PS3.3 C.4.14).
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
NOW: Final[Verdict] = "now"
HOLD: Final[Verdict] = "hold"
EXAMINING: Final[Verdict] = "examining"


class StepState(TypedDict):
    """What the worker remembers about one procedure step of a study."""

    status: str  # IN PROGRESS, COMPLETED or DISCONTINUED
    #: The SOPInstanceUIDs it references; None when the step names several studies (which of
    #: its instances are this study's is then unknown).
    instances: list[str] | None
    released: bool  # the study was announced since the step became final


class StudyState(TypedDict):
    """What the worker remembers about one study (the table value)."""

    instances: dict[str, dict[str, Any]]  # SOPInstanceUID -> InstanceRef as JSON
    first_received_at: float  # epoch seconds
    last_received_at: float
    announced: int  # number of instances in the last ready event scored
    source: NotRequired[str]  # calling AE title of the first instance
    pending_since: NotRequired[float]  # arrival of the oldest instance not yet announced
    parked_until: NotRequired[float]  # scoring failed transiently: not before this time
    last_event_at: NotRequired[float]  # the newest instance's event_time (listener's clock)
    steps: NotRequired[dict[str, StepState]]  # procedure step UID -> what the modality said
    #: SOPInstanceUID -> [its series and acquisition, how many instances that acquisition
    #: has], for the instances whose headers tell it (:func:`header_complete`)
    acquisitions: NotRequired[dict[str, list[Any]]]


#: The listener's Kafka headers with an instance's counts
#: (``dicom_listener.handlers.COUNT_HEADERS``).
IMAGES_IN_ACQUISITION = "scanwatch-images-in-acquisition"
ACQUISITION_NUMBER = "scanwatch-acquisition-number"
NUMBER_OF_FRAMES = "scanwatch-number-of-frames"


def _count(headers: Mapping[str, bytes], name: str) -> int | None:
    value = headers.get(name, b"")
    return int(value) if value.isdigit() else None


def acquisition_of(event: InstanceReceivedV1, headers: Mapping[str, bytes]) -> list[Any] | None:
    """[group, expected instances] of an instance from its counts, or None if they do not
    tell: a multi-frame instance is a group of one (an Enhanced MR holds its series' frames);
    else the series' acquisition (its number, if any) of ImagesInAcquisition instances."""
    frames = _count(headers, NUMBER_OF_FRAMES)
    if frames is not None and frames > 1:
        return [f"{event.SeriesInstanceUID}/{event.SOPInstanceUID}", 1]
    expected = _count(headers, IMAGES_IN_ACQUISITION)
    if not expected:
        return None
    number = _count(headers, ACQUISITION_NUMBER)
    return [f"{event.SeriesInstanceUID}/{'' if number is None else number}", expected]


def header_complete(state: StudyState) -> bool:
    """Whether every instance's counts are known and every series acquisition holds exactly
    the instances its ImagesInAcquisition says (more than that: the counts are wrong)."""
    known = state.get("acquisitions", {})
    if not state["instances"] or known.keys() != state["instances"].keys():
        return False
    expected = {group: count for group, count in known.values()}
    arrived = Counter(group for group, _ in known.values())
    return all(arrived[group] == count for group, count in expected.items())


def add_instance(
    state: StudyState | None,
    event: InstanceReceivedV1,
    now: float,
    headers: Mapping[str, bytes] | None = None,
    published_at: float | None = None,
) -> StudyState:
    """Record an instance (``headers``: its event's Kafka headers, with its counts;
    ``published_at``: its record's timestamp, see :func:`event_time`).

    A redelivered or re-sent instance (same SOPInstanceUID, same sha256) changes nothing. A new
    version of an instance (same SOPInstanceUID, other bytes: the listener keeps both) replaces
    the reference and makes the whole study due for scoring again.
    """
    if state is None:
        state = _new_state(now, event.calling_ae_title)
    previous = state["instances"].get(event.SOPInstanceUID)
    if previous is not None and previous["sha256"] == event.sha256:
        return state
    updated = state.copy()
    if not state["instances"]:  # the first instance (a procedure step may have come first)
        updated["first_received_at"] = now
    updated["instances"] = {
        **state["instances"],
        event.SOPInstanceUID: event.ref().model_dump(mode="json"),
    }
    updated["last_received_at"] = now
    updated["last_event_at"] = max(state.get("last_event_at", 0.0), event_time(event, published_at))
    acquisition = acquisition_of(event, headers or {})
    if acquisition is not None:
        updated["acquisitions"] = {
            **state.get("acquisitions", {}),
            event.SOPInstanceUID: acquisition,
        }
    if len(state["instances"]) <= state["announced"]:
        updated["pending_since"] = now  # the first change since the last announcement
    if previous is not None:
        updated["announced"] = 0  # same count, other content: announce the study again
    return updated


def event_time(event: InstanceReceivedV1, published_at: float | None) -> float:
    """When the listener accepted the instance or, if later, put its event on Kafka (the
    record's timestamp, None where it has none): the time its quiet period counts from."""
    accepted = event.occurred_at.timestamp()
    return accepted if published_at is None else max(accepted, published_at)


def _new_state(now: float, source: str) -> StudyState:
    return StudyState(
        instances={}, first_received_at=now, last_received_at=now, announced=0, source=source
    )


def add_step(state: StudyState | None, event: ProcedureStepV1, now: float) -> StudyState:
    """Record what a modality said of a procedure step of this study (a step may be reported
    before any of its instances arrived). A redelivered event changes nothing."""
    if state is None:
        state = _new_state(now, event.calling_ae_title)
    steps = state.get("steps", {})
    known = steps.get(event.procedure_step_uid)
    if known is not None and known["status"] != IN_PROGRESS:
        return state  # final: a redelivery, or an older event read late
    referenced = None
    if event.step_studies == [event.StudyInstanceUID]:
        referenced = [ref.SOPInstanceUID for ref in event.instances]
    step = StepState(status=event.status, instances=referenced, released=False)
    return StudyState(**{**state, "steps": {**steps, event.procedure_step_uid: step}})


def completion(state: StudyState, trust_headers: bool = False) -> Verdict | None:
    """What tells the study complete, before the quiet period: its procedure steps
    (:func:`step_verdict`), else, for a sender trusted on them, its instances' counts."""
    verdict = step_verdict(state)
    if verdict is None and trust_headers and header_complete(state):
        return NOW
    return verdict


def step_verdict(state: StudyState) -> Verdict | None:
    """What the study's procedure steps say: ready :data:`NOW`, :data:`HOLD` (until the maximum
    wait), :data:`EXAMINING` (a step in progress), or None: no step to go by (none reported,
    every final one announced already, or a completed step whose instances are not known), so
    the quiet period decides."""
    steps = list(state.get("steps", {}).values())
    if not steps or all(step["released"] for step in steps):
        return None
    if any(step["status"] == IN_PROGRESS for step in steps):
        return EXAMINING
    if any(step["status"] == DISCONTINUED for step in steps):
        return NOW
    if any(step["instances"] is None for step in steps):
        return None
    return NOW if not missing(state) else HOLD


def missing(state: StudyState) -> int:
    """How many instances the study's completed steps reference that have not arrived."""
    referenced = {
        uid
        for step in state.get("steps", {}).values()
        if step["status"] == COMPLETED
        for uid in step["instances"] or []
    }
    return len(referenced - state["instances"].keys())


def has_unannounced(state: StudyState) -> bool:
    """Some instances were never announced (a parked study's count as not announced)."""
    return len(state["instances"]) > state["announced"]


def is_due(state: StudyState, now: float) -> bool:
    """Some instances were never announced, and the study is not parked."""
    return has_unannounced(state) and now >= state.get("parked_until", 0.0)


def is_ready(
    state: StudyState,
    now: float,
    quiet_period_s: float,
    max_wait_s: float,
    caught_up: bool | None = None,
    trust_headers: bool = False,
    exam_max_wait_s: float | None = None,
    listener_behind: bool = False,
) -> bool:
    """True when some instances were never announced and the study is complete
    (:func:`completion`), or quiet, or waited enough.

    ``caught_up``: whether every event of the study's partition up to
    :func:`quiet_until` has been read (None: not known; see the module's docstring).
    ``trust_headers``: whether the study's sender fills its counts correctly.
    ``exam_max_wait_s``: how long a study whose procedure step is still in progress may wait
    (None: ``max_wait_s``); such a study is also released once no instance has come for
    ``max_wait_s``.
    ``listener_behind``: a listener may still hold an instance accepted before the quiet period
    ended (:mod:`inference_worker.watermarks`): held until the maximum wait."""
    if not is_due(state, now):
        return False
    waiting_since = state.get("pending_since", state["first_received_at"])
    verdict = completion(state, trust_headers)
    if verdict == EXAMINING:
        silent = now - state["last_received_at"] >= max_wait_s
        exam_limit = max_wait_s if exam_max_wait_s is None else exam_max_wait_s
        return silent or now - waiting_since >= exam_limit
    if verdict is not None:
        return verdict == NOW or now - waiting_since >= max_wait_s
    if listener_behind:
        return now - waiting_since >= max_wait_s
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
    """Remember that a ready event with ``count`` instances was taken up for scoring: the
    study's final procedure steps have had their say (later instances wait out the quiet
    period)."""
    updated = StudyState(
        **{**state, "announced": max(state["announced"], count), "parked_until": 0.0}
    )
    if "steps" in state:
        updated["steps"] = {
            uid: StepState(
                **{**step, "released": step["released"] or step["status"] != IN_PROGRESS}
            )
            for uid, step in state["steps"].items()
        }
    return updated


def park(state: StudyState, until: float) -> StudyState:
    """Scoring failed transiently beyond its retries: announce the study again at ``until``."""
    return StudyState(**{**state, "announced": 0, "parked_until": until})
