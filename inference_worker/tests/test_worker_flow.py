"""The worker's flow with fakes: no Kafka, no Faust, no model server, an injected clock."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from inference_worker import flow as flow_module
from inference_worker.assembly import (
    ACQUISITION_NUMBER,
    IMAGES_IN_ACQUISITION,
    StudyState,
    add_instance,
    mark_announced,
    ready_event,
)
from inference_worker.config import Settings
from inference_worker.errors import (
    FhirUnavailable,
    ModelUnavailable,
    SignatureMismatch,
    UnusableStudy,
)
from inference_worker.flow import ArrivalGate, Origin, ReadProgress, WorkerFlow
from inference_worker.metrics import WorkerMetrics
from inference_worker.tests.test_worker_assembly import received
from scanwatch import kafka
from schemas import (
    DeadLetterV1,
    InferenceResultV1,
    InstanceReceivedV1,
    ProcedureStepV1,
    StepInstanceRef,
    StudyReadyV1,
)
from schemas.topics import STUDY_PARTITIONS

STUDY = "1.2.826.0.1.3680043.8.498.7"
KEY = STUDY.encode()
QUIET, PARK = 5.0, 60.0


def result_for(ready: StudyReadyV1) -> InferenceResultV1:
    """A fake scorer's result for ``ready`` (the worker's tests share it)."""
    return InferenceResultV1(
        StudyInstanceUID=ready.StudyInstanceUID,
        SeriesInstanceUID=ready.StudyInstanceUID + ".1",
        model_name="m",
        model_version=1,
        class_names=["normal", "mass"],
        probabilities=[0.25, 0.75],
        predicted_class="mass",
        anomaly_score=0.75,
        threshold=0.5,
        slice_count=len(ready.instances),
        observation_id="obs",
    )


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []

    async def send(self, *, key: bytes | None, value: bytes) -> None:
        self.sent.append((key, value))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    image_size: int | None = 32

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def check_signature(self) -> int:
        if self.error is not None:
            raise self.error
        return 32


class FakeScorer:
    """Scores with ``behaviour(ready)``: return a result, or raise."""

    def __init__(self, behaviour: Callable[[StudyReadyV1], Awaitable[InferenceResultV1]]) -> None:
        self.model = FakeModel()
        self.behaviour = behaviour
        self.scored: list[int] = []

    async def score(self, ready: StudyReadyV1) -> InferenceResultV1:
        self.scored.append(len(ready.instances))
        return await self.behaviour(ready)


async def succeed(ready: StudyReadyV1) -> InferenceResultV1:
    return result_for(ready)


class World:
    def __init__(
        self, scorer: FakeScorer | None = None, owns: bool = True, **settings: object
    ) -> None:
        self.studies: dict[bytes, StudyState] = {}
        self.ready, self.results = Sink(), Sink()
        self.dlq: dict[str, Sink] = {}
        self.clock = Clock()
        self.metrics = WorkerMetrics()
        self.scorer = scorer or FakeScorer(succeed)
        self.flow = WorkerFlow(
            Settings(quiet_period_s=QUIET, park_s=PARK, **settings),  # type: ignore[arg-type]
            self.scorer,
            self.studies,
            self.ready,
            self.results,
            lambda topic: self.dlq.setdefault(topic + ".dlq", Sink()),
            lambda key: owns,
            self.metrics,
            clock=self.clock,
            end_offset=self.end_offset,
        )
        self.ends: dict[int, int] = {}
        self.asked: list[int] = []

    async def end_offset(self, partition: int) -> int | None:
        self.asked.append(partition)
        return self.ends.get(partition)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def receive(self, *numbers: int) -> None:
        for n in numbers:
            await self.flow.assemble(received(n).to_bytes(), Origin(InstanceReceivedV1.SCHEMA))

    def ready_events(self) -> list[StudyReadyV1]:
        return [StudyReadyV1.from_bytes(value) for _, value in self.ready.sent]

    async def score(self, ready: StudyReadyV1) -> None:
        await self.flow.score(ready.to_bytes(), Origin(StudyReadyV1.SCHEMA, 0, 7, KEY))


async def step(world: World, status: str, study: str, numbers: tuple[int, ...]) -> None:
    """The modality reports procedure step 1.2.3.4 of ``study`` with ``status``, referencing
    instances ``<study>.1.<n>`` of series ``<study>.1`` (the store's tests share it)."""
    event = ProcedureStepV1(
        StudyInstanceUID=study,
        procedure_step_uid="1.2.3.4",
        status=status,
        step_studies=[study],
        instances=[
            StepInstanceRef(SeriesInstanceUID=study + ".1", SOPInstanceUID=f"{study}.1.{n}")
            for n in numbers
        ],
        calling_ae_title="MR1",
    )
    await world.flow.procedure_step(event.to_bytes(), Origin(ProcedureStepV1.SCHEMA))


def test_a_quiet_study_is_announced_once_and_scored():
    async def run() -> World:
        world = World()
        await world.receive(1, 2)
        await world.flow.release_ready_studies()
        assert world.ready.sent == []  # still inside the quiet period
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        await world.flow.release_ready_studies()  # sent, not seen back yet: not again
        [ready] = world.ready_events()
        assert len(ready.instances) == 2
        await world.score(ready)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()  # scored: nothing new to announce
        return world

    world = asyncio.run(run())
    assert len(world.ready.sent) == 1
    assert world.scorer.scored == [2]
    [(key, value)] = world.results.sent
    assert key == KEY and InferenceResultV1.from_bytes(value).slice_count == 2
    assert world.studies[KEY]["announced"] == 2


def test_a_ready_event_that_never_reaches_the_scorer_is_announced_again():
    """One sent while the partitions were being reassigned can be lost; scoring is idempotent,
    so the study is announced again after park_s rather than left unscored."""

    async def run() -> World:
        world = World()
        await world.receive(1, 2)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()  # sent, and lost: never scored
        world.clock.now += PARK - 0.5
        await world.flow.release_ready_studies()  # not yet
        assert len(world.ready.sent) == 1
        world.clock.now += 0.5
        await world.flow.release_ready_studies()
        [_, again] = world.ready_events()
        await world.score(again)
        world.clock.now += PARK
        await world.flow.release_ready_studies()  # scored: never again
        return world

    world = asyncio.run(run())
    assert len(world.ready.sent) == 2
    assert world.scorer.scored == [2]


def test_only_the_owner_of_a_partition_announces():
    async def run() -> World:
        world = World(owns=False)
        await world.receive(1)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        return world

    assert asyncio.run(run()).ready.sent == []


def test_an_unusable_message_is_dead_lettered_with_its_origin():
    async def run() -> World:
        world = World()
        origin = Origin(InstanceReceivedV1.SCHEMA, 3, 42, b"k")
        await world.flow.assemble(b"{not json", origin)
        return world

    world = asyncio.run(run())
    [(key, value)] = world.dlq[InstanceReceivedV1.SCHEMA + ".dlq"].sent
    letter = DeadLetterV1.from_bytes(value)
    assert key == b"k"
    assert (letter.source_partition, letter.source_offset, letter.key) == (3, 42, "k")
    assert letter.error_class == "unusable" and letter.payload == "{not json"
    assert world.studies == {}
    labels = {"topic": InstanceReceivedV1.SCHEMA, "error_class": "unusable"}
    assert world.metric("scanwatch_worker_dead_letters_total", **labels) == 1


def test_an_unusable_study_is_dead_lettered():
    async def unusable(ready: StudyReadyV1) -> InferenceResultV1:
        raise UnusableStudy("no MR series in the study")

    async def run() -> World:
        world = World(FakeScorer(unusable))
        await world.receive(1)
        await world.score(ready_event(STUDY, world.studies[KEY], QUIET))
        return world

    world = asyncio.run(run())
    [(_, value)] = world.dlq[StudyReadyV1.SCHEMA + ".dlq"].sent
    letter = DeadLetterV1.from_bytes(value)
    assert letter.reason == "no MR series in the study" and letter.source_offset == 7
    assert world.results.sent == []


def test_a_superseded_ready_event_is_skipped():
    async def run() -> World:
        world = World()
        await world.receive(1)
        older = ready_event(STUDY, world.studies[KEY], QUIET)
        await world.receive(2)
        world.studies[KEY] = mark_announced(world.studies[KEY], 2)  # the newer one was scored
        await world.score(older)
        return world

    world = asyncio.run(run())
    assert world.scorer.scored == [] and world.results.sent == []


@pytest.mark.parametrize("error", [ModelUnavailable("down"), FhirUnavailable("503")])
def test_a_transient_failure_parks_the_study_until_it_is_announced_again(error):
    async def fail(ready: StudyReadyV1) -> InferenceResultV1:
        raise error

    async def run() -> World:
        world = World(FakeScorer(fail))
        await world.receive(1)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        await world.score(world.ready_events()[0])
        parked_at = world.clock.now
        assert world.studies[KEY]["parked_until"] == parked_at + PARK
        world.clock.now = parked_at + PARK - 1
        await world.flow.release_ready_studies()
        assert len(world.ready.sent) == 1  # still parked
        world.clock.now = parked_at + PARK
        await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert len(world.ready.sent) == 2  # announced again, never dropped
    assert world.results.sent == [] and world.dlq == {}
    assert world.metric("scanwatch_worker_studies_parked_total") == 1


@pytest.mark.parametrize("error", [SignatureMismatch("no signature"), RuntimeError("bug")])
def test_a_fatal_failure_stops_the_worker(error):
    async def fail(ready: StudyReadyV1) -> InferenceResultV1:
        raise error

    async def run() -> None:
        world = World(FakeScorer(fail))
        await world.receive(1)
        await world.score(ready_event(STUDY, world.studies[KEY], QUIET))

    with pytest.raises(type(error)):
        asyncio.run(run())


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until ``condition`` holds (no clock involved)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)  # a yield to the event loop, not a wait on time
    raise AssertionError("condition never held")


def test_ready_events_of_one_study_are_scored_one_at_a_time_in_order():
    async def run() -> World:
        gate = asyncio.Event()
        started: list[int] = []
        finished: list[int] = []

        async def slow(ready: StudyReadyV1) -> InferenceResultV1:
            started.append(len(ready.instances))
            if len(ready.instances) == 1:
                await gate.wait()
            finished.append(len(ready.instances))
            return result_for(ready)

        world = World(FakeScorer(slow))
        await world.receive(1)
        first = ready_event(STUDY, world.studies[KEY], QUIET)
        await world.receive(2)
        second = ready_event(STUDY, world.studies[KEY], QUIET)
        one = asyncio.create_task(world.score(first))
        two = asyncio.create_task(world.score(second))
        # Both are in: the first scoring, the second waiting for the study's lock.
        await until(lambda: started == [1] and world.flow._lock_users.get(KEY) == 2)
        assert started == [1]
        gate.set()
        await asyncio.gather(one, two)
        assert started == finished == [1, 2]
        assert world.flow._study_locks == {} and world.flow._lock_users == {}
        return world

    world = asyncio.run(run())
    assert [InferenceResultV1.from_bytes(v).slice_count for _, v in world.results.sent] == [1, 2]


def test_check_model_refuses_a_broken_signature_and_tolerates_a_server_not_up_yet():
    world = World()
    world.scorer.model = FakeModel(ModelUnavailable("not yet"))
    asyncio.run(world.flow.check_model())  # logged only
    world.scorer.model = FakeModel(SignatureMismatch("wrong outputs"))
    with pytest.raises(SignatureMismatch):
        asyncio.run(world.flow.check_model())


PARTITION = kafka.partition_for(KEY, STUDY_PARTITIONS)


def test_a_lagging_worker_scores_each_study_once_when_its_partition_is_read():
    """Issue 20, point 6: the worker reads the first half of a study, then falls behind its
    partition (other studies' events in between) for longer than the quiet period. It neither
    releases the half study nor counts the quiet period on its own clock: one ready event,
    with every instance, once the partition has been read past the study."""
    listener_time = 1000.0  # the listener took all 6 instances within a second

    async def read(world: World, offset: int, event: InstanceReceivedV1) -> None:
        origin = Origin(InstanceReceivedV1.SCHEMA, PARTITION, offset)
        await world.flow.assemble(event.to_bytes(), origin)

    def at(n: int, t: float, study: str = STUDY) -> InstanceReceivedV1:
        event = received(n, study=study)
        return event.model_copy(update={"occurred_at": datetime.fromtimestamp(t, UTC)})

    async def run() -> World:
        world = World()
        world.ends[PARTITION] = 500  # the backlog: 500 events on the partition
        for n in (1, 2, 3):
            await read(world, n - 1, at(n, listener_time + 0.1 * n))
        for step in range(6):  # the worker's clock runs on, the partition is read slowly
            world.clock.now += QUIET
            other = "1.2.826.0.1.3680043.8.498.99"
            await read(world, 3 + step, at(step, listener_time + 0.5, study=other))
            await world.flow.release_ready_studies()
        assert world.ready_events() == []  # the old rule sent a 3-instance study here
        for n in (4, 5, 6):
            await read(world, 5 + n, at(n, listener_time + 0.1 * n))
        await world.flow.release_ready_studies()
        assert world.ready_events() == []  # still behind: events up to +0.6 s + quiet unread
        world.ends[PARTITION] = 12  # the rest of the backlog read: nothing unread
        await world.flow.release_ready_studies()
        [ready] = [r for r in world.ready_events() if r.StudyInstanceUID == STUDY]
        await world.score(ready)
        world.clock.now += 10 * QUIET
        await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert [len(r.instances) for r in world.ready_events() if r.StudyInstanceUID == STUDY] == [6]
    assert world.scorer.scored == [6]


def test_a_study_read_on_while_the_broker_is_asked_is_not_released_from_its_older_state():
    """The release pass asks the broker for the partition's end; meanwhile the worker reads the
    rest of the study and reaches that end. The pass must not announce the study as it was
    when the pass began (its first half), but the whole study, once."""
    listener_time = 1000.0

    def at(n: int, t: float) -> InstanceReceivedV1:
        return received(n).model_copy(update={"occurred_at": datetime.fromtimestamp(t, UTC)})

    async def run() -> World:
        world = World()
        for n in (1, 2, 3):
            origin = Origin(InstanceReceivedV1.SCHEMA, PARTITION, n - 1)
            await world.flow.assemble(at(n, listener_time + 0.1 * n).to_bytes(), origin)
        world.clock.now += 2 * QUIET  # paused past the quiet period; the rest is on Kafka

        async def end_while_the_rest_is_read(partition: int) -> int | None:
            for n in (4, 5, 6):  # the agent reads on while the pass awaits the broker
                origin = Origin(InstanceReceivedV1.SCHEMA, PARTITION, n - 1)
                await world.flow.assemble(at(n, listener_time + 0.1 * n).to_bytes(), origin)
            return 6

        world.flow.end_offset = end_while_the_rest_is_read
        await world.flow.release_ready_studies()
        world.clock.now += QUIET
        world.flow.end_offset = world.end_offset
        world.ends[PARTITION] = 6
        await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert [len(r.instances) for r in world.ready_events()] == [6]


def test_a_listener_whose_outbox_fell_behind_has_its_study_scored_once():
    """Kafka was unreachable from the listener for 40 s while it accepted a study of 6. When
    Kafka is back its outbox publishes them; the worker has read the first 3 and is at the
    partition's end when the release pass runs. Counted from acceptance the study's quiet
    period is long over: the old rule announced those 3. Counted from publication it is not."""
    accepted = 1000.0

    async def publish(world: World, numbers: tuple[int, ...], published: float) -> None:
        for n in numbers:
            event = received(n).model_copy(
                update={"occurred_at": datetime.fromtimestamp(accepted + 0.1 * n, UTC)}
            )
            origin = Origin(InstanceReceivedV1.SCHEMA, PARTITION, n - 1, timestamp=published)
            await world.flow.assemble(event.to_bytes(), origin)
        world.ends[PARTITION] = numbers[-1]

    async def run() -> World:
        world = World()
        world.clock.now = accepted + 40.0
        await publish(world, (1, 2, 3), accepted + 40.0)
        await world.flow.release_ready_studies()
        assert world.ready_events() == []
        world.clock.now += 0.5
        await publish(world, (4, 5, 6), world.clock.now)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert [len(r.instances) for r in world.ready_events()] == [6]


def test_a_newer_event_read_on_the_partition_is_enough_to_release():
    """Reading an event the listener took after the study's quiet period tells that nothing
    of the study can still be unread before it (the outbox publishes in order)."""
    progress = ReadProgress()
    assert progress.read_past(PARTITION, 1005.0) is None
    progress.read(Origin(InstanceReceivedV1.SCHEMA, PARTITION, 7), 1004.0)
    assert progress.read_past(PARTITION, 1005.0) is False
    assert not progress.read_to(PARTITION, 100) and not progress.read_to(PARTITION, None)
    assert progress.read_to(PARTITION, 8)  # nothing left unread
    progress.read(Origin(InstanceReceivedV1.SCHEMA, PARTITION, 8), None)  # did not parse
    progress.read(Origin(InstanceReceivedV1.SCHEMA, PARTITION, 9), 1005.5)
    assert progress.read_past(PARTITION, 1005.0) is True
    progress.forget({PARTITION})  # revoked: another worker may have read on
    assert progress.read_past(PARTITION, 1005.0) is None


def test_a_paused_worker_asks_the_broker_how_far_the_partition_goes():
    """A worker paused (CPU starved, stopped) past a study's quiet period resumes with an old
    idea of its partition's end: the study's last instances, sent meanwhile, are unread. The
    end is asked of the broker at release time, so the study waits for them."""

    async def run() -> World:
        world = World()
        event = received(1).model_copy(update={"occurred_at": datetime.fromtimestamp(1000, UTC)})
        origin = Origin(InstanceReceivedV1.SCHEMA, PARTITION, 0)
        await world.flow.assemble(event.to_bytes(), origin)
        world.clock.now += QUIET
        world.ends[PARTITION] = 2  # instance 2 was sent while the worker was paused
        await world.flow.release_ready_studies()
        assert world.ready_events() == [] and world.asked == [PARTITION]
        second = received(2).model_copy(update={"occurred_at": datetime.fromtimestamp(1001, UTC)})
        await world.flow.assemble(
            second.to_bytes(), Origin(InstanceReceivedV1.SCHEMA, PARTITION, 1)
        )
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert [len(r.instances) for r in world.ready_events()] == [2]


def test_a_completed_procedure_step_releases_its_study_without_the_timer():
    """The last instance a completed step names is announced as it is read (quiet period 0),
    not at the next timer pass; while the step is in progress the timer holds the study."""

    async def run() -> World:
        world = World()

        await step(world, "IN PROGRESS", STUDY, ())
        await world.receive(1, 2)
        world.clock.now += QUIET * 10
        await world.flow.release_ready_studies()
        assert world.ready.sent == []  # in progress: held past the quiet period
        await step(world, "COMPLETED", STUDY, (1, 2, 3))
        assert world.ready.sent == []  # instance 3 not read yet
        await world.receive(3)
        [ready] = world.ready_events()  # at once
        assert len(ready.instances) == 3 and ready.quiet_period_s == 0.0
        await world.score(ready)
        await world.flow.procedure_step(b"{}", Origin(ProcedureStepV1.SCHEMA, 1, 9))
        return world

    world = asyncio.run(run())
    assert world.scorer.scored == [3]
    [(_, letter)] = world.dlq[ProcedureStepV1.SCHEMA + ".dlq"].sent  # the unusable event
    assert DeadLetterV1.from_bytes(letter).source_offset == 9


def test_a_sender_trusted_on_its_counts_has_its_study_announced_as_its_last_instance_is_read():
    """The counts come as the listener's Kafka headers on each instance event."""

    async def run(trusted: list[str]) -> World:
        world = World(complete_by_headers=trusted)
        headers = ((IMAGES_IN_ACQUISITION, b"2"), (ACQUISITION_NUMBER, b"1"))
        for n in (1, 2):
            origin = Origin(InstanceReceivedV1.SCHEMA, headers=headers)
            await world.flow.assemble(received(n).to_bytes(), origin)
        return world

    [ready] = asyncio.run(run(["MR1"])).ready_events()
    assert len(ready.instances) == 2 and ready.quiet_period_s == 0.0
    assert asyncio.run(run(["CT9"])).ready.sent == []  # others wait for the quiet period


def test_a_freed_scoring_slot_goes_to_the_study_that_arrived_first():
    """Issue 20, point 5: with one slot busy, studies read later but arrived earlier are
    scored first (a burst read first does not overtake an older study)."""

    async def run() -> list[str]:
        hold = asyncio.Event()
        order: list[str] = []

        async def scored(ready: StudyReadyV1) -> InferenceResultV1:
            order.append(ready.StudyInstanceUID)
            if len(order) == 1:
                await hold.wait()
            return result_for(ready)

        world = World(FakeScorer(scored), scoring_concurrency=1)

        def ready_of(study: str, arrived: float) -> StudyReadyV1:
            event = received(1, study=study)
            return ready_event(study, add_instance(None, event, now=arrived), QUIET)

        busy = asyncio.create_task(world.score(ready_of("1.2.100", 50.0)))
        await until(lambda: order == ["1.2.100"])
        # Read in this order; arrived in the opposite one.
        later = [ready_of("1.2.103", 30.0), ready_of("1.2.102", 20.0), ready_of("1.2.101", 10.0)]
        waiting = [asyncio.create_task(world.score(ready)) for ready in later]
        await until(lambda: world.flow.gate.waiting == 3)
        assert world.metric("scanwatch_worker_studies_waiting_for_slot") == 3
        hold.set()
        await asyncio.gather(busy, *waiting)
        assert world.flow.gate.free == 1 and world.flow.gate.waiting == 0
        return order

    assert asyncio.run(run()) == ["1.2.100", "1.2.101", "1.2.102", "1.2.103"]


def test_a_cancelled_wait_for_a_slot_does_not_lose_the_slot():
    async def run() -> ArrivalGate:
        gate = ArrivalGate(1)
        async with gate.slot(1.0):
            waiter = asyncio.create_task(_enter(gate, 2.0))
            await until(lambda: gate.waiting == 1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        await _enter(gate, 3.0)  # the slot came back
        return gate

    assert asyncio.run(run()).free == 1


async def _enter(gate: ArrivalGate, arrived_at: float) -> None:
    async with gate.slot(arrived_at):
        pass


def test_a_study_waiting_for_a_slot_is_not_announced_again():
    """However long it waits behind others, a ready study held for a slot is not taken for a
    lost announcement (announced again after park_s) and scored twice."""

    async def run() -> World:
        hold = asyncio.Event()

        async def scored(ready: StudyReadyV1) -> InferenceResultV1:
            if ready.StudyInstanceUID == "1.2.100":
                await hold.wait()
            return result_for(ready)

        world = World(FakeScorer(scored), scoring_concurrency=1)
        busy = add_instance(None, received(1, study="1.2.100"), now=world.clock.now)
        busy_task = asyncio.create_task(world.score(ready_event("1.2.100", busy, QUIET)))
        await world.receive(1)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        [ready] = world.ready_events()
        waiting = asyncio.create_task(world.score(ready))
        await until(lambda: world.flow.gate.waiting == 1)
        world.clock.now += PARK * 2
        await world.flow.release_ready_studies()
        assert len(world.ready.sent) == 1
        hold.set()
        await asyncio.gather(busy_task, waiting)
        return world

    assert asyncio.run(run()).scorer.scored == [1, 1]


@pytest.mark.parametrize("retention", [2 * flow_module.SWEEP_EVERY_S, 120.0])
def test_scored_studies_past_their_retention_are_forgotten_from_their_own_partition(
    retention: float,
):
    """The table is held in memory and grew with every study ever received. A study all of
    whose instances were scored is removed once nothing came for it for study_retention_s,
    when an event of its own partition is read (the removal goes to that changelog partition);
    a study with instances not yet scored, a recent one and one of another partition stay.
    A partition is looked over hourly, or every half retention where that is shorter."""
    every = retention / 2  # a partition's studies are looked over this often

    def study_on(partition: int, skip: int = 0) -> str:
        uids = (f"1.2.826.0.1.3680043.8.498.77.{i}" for i in itertools.count())
        matching = (
            u for u in uids if kafka.partition_for(u.encode(), STUDY_PARTITIONS) == partition
        )
        return next(itertools.islice(matching, skip, None))

    old, unscored, recent, elsewhere, newcomer = (
        study_on(0, 0),
        study_on(0, 1),
        study_on(0, 2),
        study_on(1, 0),
        study_on(0, 3),
    )

    async def run() -> World:
        world = World(study_retention_s=retention)
        assert world.flow.sweep_every_s == every

        async def receive(study: str, n: int) -> None:
            partition = kafka.partition_for(study.encode(), STUDY_PARTITIONS)
            origin = Origin(InstanceReceivedV1.SCHEMA, partition, n, study.encode())
            await world.flow.assemble(received(n, study=study).to_bytes(), origin)
            # The quiet period on the fake clock, not from the events' own (real) times.
            world.flow.progress.forget({partition})

        async def scored(*studies: str) -> None:
            world.clock.now += QUIET
            await world.flow.release_ready_studies()
            for event in world.ready_events():
                if event.StudyInstanceUID in studies:
                    await world.score(event)
            world.ready.sent.clear()

        for study in (old, elsewhere):
            await receive(study, 1)
        await scored(old, elsewhere)
        await receive(unscored, 1)  # never announced
        world.clock.now += retention - 10
        await receive(recent, 1)
        await scored(recent)
        world.clock.now += every  # old, unscored and elsewhere: past their retention
        await receive(newcomer, 1)  # an event of partition 0
        assert set(world.studies) == {s.encode() for s in (unscored, recent, elsewhere, newcomer)}
        world.clock.now += every - 1  # recent is old now, but partition 0 was just looked over
        assert world.clock.now - world.studies[recent.encode()]["last_received_at"] > retention
        await receive(newcomer, 2)
        assert recent.encode() in world.studies
        world.clock.now += every
        await receive(elsewhere, 2)  # partition 1 looked over: elsewhere has a new instance
        await receive(newcomer, 3)  # partition 0 again: recent goes
        return world

    world = asyncio.run(run())
    assert set(world.studies) == {s.encode() for s in (unscored, elsewhere, newcomer)}


def test_a_study_too_large_to_announce_is_reported_once_and_holds_up_no_other():
    """A ready event past the ready topic's record limit would fail to send in the timer and
    crash the worker after every restart, holding up every study of its partitions."""

    async def run() -> World:
        world = World()
        small = ready_event(STUDY, add_instance(None, received(1), 0.0), QUIET).to_bytes()
        world.flow.max_ready_bytes = len(small) + 100  # one instance fits, three do not
        await world.receive(1, 2, 3)
        other = "1.2.826.0.1.3680043.8.498.99"
        await world.flow.assemble(received(1, study=other).to_bytes(), Origin("t"))
        world.clock.now += QUIET
        for _ in range(3):
            await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert [r.StudyInstanceUID for r in world.ready_events()] == ["1.2.826.0.1.3680043.8.498.99"]
    assert world.metric("scanwatch_worker_studies_too_large_total") == 1  # said once
    assert world.studies[KEY]["announced"] == 0  # not marked scored: it was not


def test_at_debug_each_pass_says_why_a_due_study_waits():
    """What an operator asks of a study that waits longer than its quiet period. (No caplog:
    the store's tests run every test here without fixtures.)"""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("inference_worker.flow")
    level = logger.level

    async def run() -> None:
        world = World()
        await world.receive(1)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            await world.flow.release_ready_studies()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    asyncio.run(run())
    [line] = [r for r in records if r.getMessage() == "study withheld"]
    assert (line.reason, line.instances, line.announced) == ("waiting", 1, 0)
    assert line.StudyInstanceUID == STUDY
