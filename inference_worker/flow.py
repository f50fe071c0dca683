"""The worker's flow (DESIGN §2), free of Faust::

    instance event --assemble--> study table <--procedure step-- MPPS event
        timer: quiet period over (and past the listeners' watermarks),
               or a step's instances all in --> ready event
        --score--> FHIR + result event

:class:`WorkerFlow` holds what the Faust agents used to keep in a closure: the study table, the
topics it sends to, the ready events in flight and the per-study scoring locks. The table is a
``MutableMapping`` (in production a :class:`~inference_worker.study_store.StudyStore` over a
Faust table, which keeps each study as a header and an entry per instance; a dict in unit
tests), the topics are sinks
(:class:`~inference_worker.ports.Sink`), the clock is injectable; :mod:`inference_worker.app`
wires it to Faust.

Errors are classified (STYLE habit 7): an unusable message or study goes to ``<topic>.dlq``
with the reason; a transient failure (model server or FHIR API down) is retried by the scorer
and then parked in the table, to be announced again later; anything else propagates, so that
the worker crashes, its supervisor restarts it and the uncommitted message is redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import ValidationError

from inference_worker.assembly import (
    EXAMINING,
    HOLD,
    NOW,
    StudyState,
    add_instance,
    add_step,
    completion,
    event_time,
    is_due,
    is_ready,
    mark_announced,
    missing,
    park,
    quiet_until,
    ready_event,
)
from inference_worker.config import Settings
from inference_worker.errors import SignatureMismatch, UnusableStudy
from inference_worker.metrics import WorkerMetrics
from inference_worker.ports import Model, Sink
from inference_worker.retry import is_transient
from inference_worker.watermarks import ListenerWatermarks
from scanwatch import kafka
from schemas import (
    DeadLetterV1,
    Event,
    InferenceResultV1,
    InstanceReceivedV1,
    ListenerWatermarkV1,
    ProcedureStepV1,
    StudyReadyV1,
)
from schemas.topics import LARGE_RECORD_BYTES, STUDY_PARTITIONS

log = logging.getLogger(__name__)

AnyEvent = TypeVar("AnyEvent", bound=Event)

#: ``DeadLetterV1.error_class`` of a message or study that cannot be used.
UNUSABLE = "unusable"
#: How often, at most, a partition's studies are looked over for ones past their retention (or
#: every half retention, where that is shorter: see ``WorkerFlow.sweep_every_s``).
SWEEP_EVERY_S = 3600.0


@dataclass(frozen=True)
class Origin:
    """Where a consumed message came from: what its dead letter names."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: float | None = None  # the record's, in seconds (None: it has none)


class ReadProgress:
    """How far this worker has read each partition of the instance topic since it was assigned
    to it: the next offset, and the newest event time (the listener's clock) read there."""

    def __init__(self) -> None:
        self.next_offset: dict[int, int] = {}
        self.newest_event_at: dict[int, float] = {}

    def read(self, origin: Origin, event_at: float | None) -> None:
        """Record one consumed instance event (``event_at`` None: it did not parse)."""
        if origin.partition is None or origin.offset is None:
            return
        partition = origin.partition
        self.next_offset[partition] = max(self.next_offset.get(partition, 0), origin.offset + 1)
        if event_at is not None:
            newest = self.newest_event_at.get(partition, event_at)
            self.newest_event_at[partition] = max(newest, event_at)

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked or reassigned: what was read there before no longer tells how far
        the partition has been read (another worker may have read on)."""
        for partition in partitions:
            self.next_offset.pop(partition, None)
            self.newest_event_at.pop(partition, None)

    def read_past(self, partition: int, until: float) -> bool | None:
        """Whether an event with an event time (:func:`~inference_worker.assembly.event_time`)
        of ``until`` or later has been read on ``partition``, which tells that every one the
        listener published before has (a partition keeps the order of publication). None:
        nothing read there since the partition was assigned."""
        if partition not in self.next_offset:
            return None
        return self.newest_event_at.get(partition, float("-inf")) >= until

    def read_to(self, partition: int, end_offset: int | None) -> bool:
        """Whether every event up to ``end_offset`` (the partition's end, None: not known) has
        been read."""
        return end_offset is not None and self.next_offset.get(partition, -1) >= end_offset


class ArrivalGate:
    """At most ``slots`` studies scored at once, the slot that frees going to the study that
    arrived first among those waiting (not to whichever ready event was read first: a burst
    on one partition does not overtake an older study on another).

    Waiting costs a ready event held by one of the scoring agent's actors (its
    ``studies_in_flight``): once every actor holds one, the agent reads no further and Faust
    stops fetching the ready topic when its buffer is full. Back-pressure, not a queue.
    """

    def __init__(self, slots: int) -> None:
        self.free = slots
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, arrived_at: float) -> AsyncIterator[None]:
        """Hold a scoring slot; ``arrived_at``: the study's first instance's arrival."""
        if self.free and not self._waiting:
            self.free -= 1
        else:
            turn = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (arrived_at, next(self._order), turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # granted as it was cancelled: pass the slot on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1

    @property
    def waiting(self) -> int:
        return sum(not turn.done() for _, _, turn in self._waiting)


def _described(key: bytes, state: StudyState) -> dict[str, object]:
    """A study's log fields: its UID and how many instances it has and were announced."""
    return {
        "StudyInstanceUID": key.decode(),
        "instances": len(state["instances"]),
        "announced": state["announced"],
    }


async def no_end_offset(partition: int) -> int | None:
    """No broker to ask (the default of :class:`WorkerFlow`'s ``end_offset``)."""
    return None


class StudyScorer(Protocol):
    """Scores a ready study and writes its FHIR resources (:class:`~.scoring.Scorer`)."""

    @property
    def model(self) -> Model: ...

    async def score(self, ready: StudyReadyV1) -> InferenceResultV1: ...


class WorkerFlow:
    """Assembles studies, announces the ready ones and scores them."""

    def __init__(
        self,
        settings: Settings,
        scorer: StudyScorer,
        studies: MutableMapping[bytes, StudyState],
        ready_topic: Sink,
        results_topic: Sink,
        dead_letter_topic: Callable[[str], Sink],
        owns: Callable[[bytes], bool],
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.time,
        end_offset: Callable[[int], Awaitable[int | None]] = no_end_offset,
    ) -> None:
        """``studies`` is keyed by the StudyInstanceUID's bytes; ``dead_letter_topic`` gives
        the dead-letter twin of a topic; ``owns`` tells whether this worker actively owns a
        study key's partition (only the owner announces it); ``end_offset`` asks the broker
        for an instance-topic partition's end offset now (None: not answered)."""
        self.settings = settings
        self.scorer = scorer
        self.studies = studies
        self.ready_topic = ready_topic
        self.results_topic = results_topic
        self.dead_letter_topic = dead_letter_topic
        self.owns = owns
        self.metrics = metrics
        self.clock = clock
        self.end_offset = end_offset
        self.progress = ReadProgress()
        self.watermarks = ListenerWatermarks(settings.listener_stale_after_s)
        # Ready events sent but not yet seen back by ``score`` (which records them in the
        # table): stops the timer from announcing the same study twice meanwhile. Lost on
        # restart, which only means a study may be announced again — scoring is idempotent.
        # An entry older than ``park_s`` no longer holds the study back: a ready event sent
        # while the partitions were being reassigned (a worker joining or restarting) has been
        # seen never to reach the scoring agent, and without this the study stayed unscored.
        # Scoring is idempotent, so announcing again costs at most a second scoring.
        self.announcing: dict[bytes, tuple[int, float]] = {}
        # With several scoring actors, two ready events of one study must not be scored at
        # once: a slower, older one could overwrite the newer result. A FIFO lock per study
        # keeps them in the order they were taken from the stream.
        self._study_locks: dict[bytes, asyncio.Lock] = {}
        self._lock_users: dict[bytes, int] = {}
        self.gate = ArrivalGate(settings.scoring_concurrency)
        # Ready events taken up by ``score`` (waiting for a slot or being scored), per study:
        # the timer does not announce these again, however long they wait for a slot.
        self._held: dict[bytes, int] = {}
        self._swept_at: dict[int, float] = {}  # partition -> when its studies were looked over
        # A study lingers at most this long past its retention: an hour of a week by default,
        # a minute of two where the retention is that short (the soak's steady table).
        self.sweep_every_s = min(SWEEP_EVERY_S, settings.study_retention_s / 2)
        #: The largest ready event the ready topic takes; studies found larger, and their size.
        self.max_ready_bytes = LARGE_RECORD_BYTES
        self._too_large: dict[bytes, int] = {}
        metrics.waiting_for_slot.set_function(lambda: self.gate.waiting)

    def partitions_revoked(self, partitions: set[int]) -> None:
        """Instance-topic partitions taken from this worker in a rebalance: how far they were
        read here, and their listeners' watermarks, no longer count."""
        self.progress.forget(partitions)
        self.watermarks.forget(partitions)

    def partitions_assigned(self, partitions: set[int]) -> None:
        """Instance-topic partitions given to this worker in a rebalance (those it kept
        included): read afresh, their studies wait for a listener's watermark there."""
        self.progress.forget(partitions)
        self.watermarks.assigned(partitions, self.clock())

    async def check_model(self) -> None:
        """Refuse to run against a model whose signature breaks the contract: raises
        :class:`SignatureMismatch`. A model server not reachable yet is only logged (it is
        checked again when scoring)."""
        try:
            await self.scorer.model.check_signature()
        except SignatureMismatch as exc:
            log.critical("served model breaks the signature contract", extra={"error": str(exc)})
            raise
        except Exception as exc:  # noqa: BLE001 - not reachable yet: checked again when scoring
            log.warning("model server not checked at start", extra={"error": str(exc)})

    async def _parsed(
        self, event_type: type[AnyEvent], value: bytes | None, origin: Origin
    ) -> AnyEvent | None:
        """``value`` as an ``event_type``; None once it went to the dead-letter topic."""
        try:
            return event_type.from_bytes(value or b"")
        except ValidationError as exc:
            reason = f"invalid {event_type.SCHEMA}: {exc}"
            await self.dead_letter(origin, value, reason, UNUSABLE)
            return None

    async def assemble(self, value: bytes | None, origin: Origin) -> None:
        """Record one ``dicom.instance.received.v1`` event in its study."""
        received = await self._parsed(InstanceReceivedV1, value, origin)
        if received is None:
            self.progress.read(origin, None)
            return
        key = received.StudyInstanceUID.encode()
        headers = dict(origin.headers)
        state = add_instance(
            self.studies.get(key), received, self.clock(), headers, origin.timestamp
        )
        self.studies[key] = state
        self.progress.read(origin, event_time(received, origin.timestamp))
        self._forget_old_studies(origin.partition)
        if log.isEnabledFor(logging.DEBUG):  # the hot path: built only when asked for
            where = {"partition": origin.partition, "offset": origin.offset}
            log.debug("instance read", extra=_described(key, state) | where)
        await self._release_if_step_done(key, state)

    def _forget_old_studies(self, partition: int | None) -> None:
        """Remove the studies of ``partition`` whose every instance was scored and to which
        nothing has come for ``study_retention_s``: looked over at most every
        :attr:`sweep_every_s`, and only from an event of that partition, since Faust writes a
        removal to the changelog partition of the event being handled, which must be the
        study's own (the timer has no event)."""
        now = self.clock()
        every = self.sweep_every_s
        if partition is None or now - self._swept_at.get(partition, -every) < every:
            return
        self._swept_at[partition] = now
        oldest = now - self.settings.study_retention_s
        old = [
            key
            for key, state in self.studies.items()
            if state is not None
            and state["last_received_at"] < oldest
            and len(state["instances"]) <= state["announced"]  # nothing unscored, not parked
            and key not in self._held
            and key not in self.announcing
            and kafka.partition_for(key, STUDY_PARTITIONS) == partition
        ]
        for key in old:
            del self.studies[key]
        if old:
            log.info(
                "scored studies forgotten", extra={"partition": partition, "studies": len(old)}
            )

    async def procedure_step(self, value: bytes | None, origin: Origin) -> None:
        """Record one ``dicom.procedure.step.v1`` event in its study; a study whose steps say it
        is complete is announced at once."""
        step = await self._parsed(ProcedureStepV1, value, origin)
        if step is None:
            return
        key = step.StudyInstanceUID.encode()
        self.studies[key] = state = add_step(self.studies.get(key), step, self.clock())
        self._forget_old_studies(origin.partition)
        await self._release_if_step_done(key, state)

    async def watermark(self, value: bytes | None, origin: Origin) -> None:
        """Record one ``dicom.listener.watermark.v1`` record, read on the partition it speaks
        for (:mod:`inference_worker.watermarks`)."""
        event = await self._parsed(ListenerWatermarkV1, value, origin)
        if event is not None and origin.partition is not None:
            self.watermarks.record(origin.partition, event)

    async def _release_if_step_done(self, key: bytes, state: StudyState) -> None:
        """Announce the study now, not at the next timer pass, when its steps say so: the
        modality's last word, or the last instance it referenced, has just been read."""
        if completion(state, self._trusts_headers(state)) == NOW:
            await self._release(key, state, self.clock(), {})

    def _trusts_headers(self, state: StudyState) -> bool:
        return state.get("source") in self.settings.complete_by_headers

    async def release_ready_studies(self) -> None:
        """Announce every study of this worker's partitions whose quiet period is over (or
        whose procedure steps say it is complete)."""
        now = self.clock()
        ends: dict[int, int | None] = {}  # end offsets asked in this pass
        # The study store knows which studies have instances to announce; a plain mapping
        # (the unit tests') is looked over whole.
        pending = getattr(self.studies, "pending", None)
        for key in pending() if pending is not None else list(self.studies):
            state = self.studies.get(key)
            if state is not None:
                await self._release(key, state, now, ends)

    async def _release(
        self, key: bytes, state: StudyState, now: float, ends: dict[int, int | None]
    ) -> None:
        """Send the study's ready event if it is ready, ours and not being announced already."""
        if not is_due(state, now):  # most: scored, nothing new
            return
        quiet = self.settings.quiet_period_for(state.get("source"))
        trust = self._trusts_headers(state)
        verdict = completion(state, trust)
        until = None if verdict else quiet_until(state, quiet)
        behind = False
        caught_up = None
        if until is not None:  # and past the listeners' watermarks (None: one is behind)
            partition = kafka.partition_for(key, STUDY_PARTITIONS)
            until = self.watermarks.read_until(partition, until, self.progress.read_past, now)
            behind = until is None
            if until is not None:
                caught_up = await self._caught_up(key, state, now, quiet, partition, until, ends)
        if not is_ready(
            state,
            now,
            quiet,
            self.settings.max_wait_s,
            caught_up,
            trust,
            self.settings.exam_max_wait_s,
            listener_behind=behind,
        ):
            self._withheld(
                key, state, "waiting", verdict=verdict, caught_up=caught_up, listener_behind=behind
            )
            return
        if not self.owns(key) or key in self._held:
            self._withheld(key, state, "held" if key in self._held else "not ours")
            return
        if self.studies.get(key) != state:
            # Read on while the broker was asked for the partition's end (or while another
            # study was announced in this pass): judged again, as it is now, at the next pass.
            # Released from the older state, a study whose rest was read meanwhile went out
            # with its first half only (the paused-worker e2e test caught it: [10, 20]).
            return
        count = len(state["instances"])
        announced, at = self.announcing.get(key, (0, now))
        if announced >= count and now - at < self.settings.park_s:
            self._withheld(key, state, "announcing", announced_at=at)
            return
        if self._too_large.get(key) == count:
            return  # found too large, and nothing has come since
        ready = ready_event(key.decode(), state, 0.0 if verdict == NOW else quiet)
        value = ready.to_bytes()
        extra = {"StudyInstanceUID": key.decode(), "instances": count}
        if len(value) > self.max_ready_bytes:
            # Sent, it would fail in the timer and crash the worker, and again after each
            # restart, holding up every study of its partitions. Said once per size.
            self._too_large[key] = count
            self.metrics.too_large.inc()
            log.error(
                "study too large to announce: not scored",
                extra=extra | {"bytes": len(value), "limit": self.max_ready_bytes},
            )
            return
        await self.ready_topic.send(key=key, value=value)
        self.announcing[key] = (count, now)
        if verdict == NOW:
            log.info("study ready: complete by its procedure steps or counts", extra=extra)
            return
        if verdict == EXAMINING:
            log.warning("study ready while its procedure step is still in progress", extra=extra)
            return
        if verdict == HOLD:
            # Held for its procedure steps until the maximum wait: scored with what came.
            absent = missing(state)
            self.metrics.step_instances_missing.inc(absent)
            log.warning(
                "study ready at the maximum wait, its procedure steps not complete",
                extra=extra | {"missing_instances": absent},
            )
            return
        log.info("study ready", extra=extra)

    @staticmethod
    def _withheld(key: bytes, state: StudyState, reason: str, **detail: object) -> None:
        """A due study not announced in this pass, and why (DEBUG: a line per study and pass;
        what an operator asks of a study that waits longer than its quiet period)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("study withheld", extra=_described(key, state) | {"reason": reason, **detail})

    async def _caught_up(
        self,
        key: bytes,
        state: StudyState,
        now: float,
        quiet: float,
        partition: int,
        until: float,
        ends: dict[int, int | None],
    ) -> bool | None:
        """Whether the study's ``partition`` has been read up to ``until`` (its last event plus
        ``quiet``, and past the listeners' last watermarks): an event from after that read, or
        the partition's end, asked of the broker now (the end the consumer last fetched may be
        older than a pause of this worker)."""
        past = self.progress.read_past(partition, until)
        if past is not False:
            return past
        due = is_ready(state, now, quiet, self.settings.max_wait_s, caught_up=True)
        if not due or not self.owns(key):
            return False  # not due even if read to the end, or not ours: nothing to ask
        if partition not in ends:
            ends[partition] = await self.end_offset(partition)
        return self.progress.read_to(partition, ends[partition])

    async def score(self, value: bytes | None, origin: Origin) -> None:
        """Score one ``dicom.study.ready.v1`` event, after any earlier one of its study."""
        ready = await self._parsed(StudyReadyV1, value, origin)
        if ready is None:
            return
        key = ready.StudyInstanceUID.encode()
        lock = self._study_locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        self._held[key] = self._held.get(key, 0) + 1
        self.announcing.pop(key, None)  # seen back: held now, not lost
        try:
            async with lock, self.gate.slot(ready.first_received_at.timestamp()):
                await self._score_one(ready, key, origin, value)
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
            self._lock_users[key] -= 1
            if not self._lock_users[key]:  # nobody else holds or waits for it
                del self._lock_users[key], self._study_locks[key]

    async def _score_one(
        self, ready: StudyReadyV1, key: bytes, origin: Origin, value: bytes | None
    ) -> None:
        now = self.clock()
        state = self.studies.get(key)
        if state is not None and state["announced"] > len(ready.instances):
            # A newer ready event of this study (more instances) was scored already.
            log.info("superseded ready event skipped", extra={"StudyInstanceUID": key.decode()})
            return
        if state is not None:
            self.studies[key] = mark_announced(state, len(ready.instances))
            waited = now - state["first_received_at"]
            self.metrics.stage_seconds.labels("assembly_wait").observe(waited)
        try:
            result = await self.scorer.score(ready)
        except UnusableStudy as exc:
            await self.dead_letter(origin, value, str(exc), UNUSABLE)
            return
        except SignatureMismatch:
            log.critical("served model breaks the signature contract; stopping")
            raise
        except Exception as exc:
            if not is_transient(exc) or (state := self.studies.get(key)) is None:
                raise
            # Retries exhausted on a transient failure: park the study; the timer announces it
            # again when the parking time is over. Never dropped.
            self.studies[key] = park(state, self.clock() + self.settings.park_s)
            self.metrics.parked.inc()
            log.warning(
                "study parked",
                extra={
                    "StudyInstanceUID": ready.StudyInstanceUID,
                    "retry_in_s": self.settings.park_s,
                    "error": str(exc),
                },
            )
            return
        await self.results_topic.send(key=key, value=result.to_bytes())

    async def dead_letter(
        self, origin: Origin, value: bytes | None, reason: str, error_class: str
    ) -> None:
        """Send a message that cannot be used to its topic's dead-letter twin, with why."""
        self.metrics.dead_letters.labels(origin.topic, error_class).inc()
        log.error(
            "dead-lettered",
            extra={"topic": origin.topic, "offset": origin.offset, "reason": reason},
        )
        letter = DeadLetterV1(
            source_topic=origin.topic,
            source_partition=origin.partition,
            source_offset=origin.offset,
            key=origin.key.decode(errors="replace") if origin.key else None,
            reason=reason,
            error_class=error_class,
            payload=(value or b"").decode(errors="replace"),
        )
        await self.dead_letter_topic(origin.topic).send(key=origin.key, value=letter.to_bytes())
