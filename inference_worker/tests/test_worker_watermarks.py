"""The listeners' watermarks in the worker's release rule (issue 20, point 6): a study is not
released while a listener may still hold some of its instances in its outbox."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from inference_worker.flow import Origin, ReadProgress
from inference_worker.tests.test_worker_assembly import received
from inference_worker.tests.test_worker_flow import KEY, QUIET, World
from inference_worker.watermarks import ListenerWatermarks
from scanwatch import kafka
from schemas import InstanceReceivedV1, ListenerWatermarkV1
from schemas.topics import STUDY_PARTITIONS

PARTITION = kafka.partition_for(KEY, STUDY_PARTITIONS)
ACCEPTED = 1000.0  # when the listener took the study's first instance
OUTAGE = 40.0  # how long its last instances waited in the outbox


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def watermark(listener: str, through: float, sent: float, closing: bool = False) -> bytes:
    return ListenerWatermarkV1(
        listener_id=listener, published_through=at(through), occurred_at=at(sent), closing=closing
    ).to_bytes()


class Partition:
    """The study's partition of the instance topic, as one worker reads it."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.offset = 0

    async def publish(self, numbers: tuple[int, ...], accepted: float, published: float) -> None:
        """Instances accepted at ``accepted`` (+0.1 s each), published at ``published``, and
        read: the worker is at the partition's end after them."""
        for n in numbers:
            event = received(n).model_copy(update={"occurred_at": at(accepted + 0.1 * n)})
            origin = Origin(InstanceReceivedV1.SCHEMA, PARTITION, self.offset, timestamp=published)
            await self.world.flow.assemble(event.to_bytes(), origin)
            self.offset += 1
        self.world.ends[PARTITION] = self.offset

    async def watermark(self, listener: str, through: float, sent: float, **kw: bool) -> None:
        origin = Origin(ListenerWatermarkV1.SCHEMA, PARTITION, 0)
        await self.world.flow.watermark(watermark(listener, through, sent, **kw), origin)


async def outage(watermarks: bool, max_wait_s: float = 600.0) -> World:
    """Six instances of one study: three published at once, three held in the listener's outbox
    for :data:`OUTAGE` seconds (Kafka's leader for the partition moving), then published."""
    world = World(max_wait_s=max_wait_s)
    partition = Partition(world)
    world.clock.now = ACCEPTED
    await partition.publish((1, 2, 3), ACCEPTED, ACCEPTED + 0.35)
    if watermarks:  # the listener's last word before the outage: 1-3 are out
        await partition.watermark("mr-gateway", ACCEPTED + 0.36, ACCEPTED + 0.4)
    # 4-6 accepted at once, but they wait in the outbox; no watermark gets out either
    for _ in range(int(OUTAGE / QUIET)):
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
    await partition.publish((4, 5, 6), ACCEPTED + 0.3, ACCEPTED + OUTAGE)
    world.clock.now += QUIET
    if watermarks:  # idle again, the listener's watermarks keep up with its clock
        await partition.watermark("mr-gateway", world.clock.now, world.clock.now)
    await world.flow.release_ready_studies()
    return world


def test_a_study_is_not_released_while_a_listener_still_holds_some_of_it():
    """Without watermarks the worker, at its partition's end and past the quiet period, has no
    way to tell the rest of the study is in the outbox: it announces 3 instances, then 6
    (the partial scoring the fault table counts after a broker kill). With them, it waits
    until the listener says everything before the quiet period's end is out: 6, once."""
    without = asyncio.run(outage(watermarks=False))
    assert [len(r.instances) for r in without.ready_events()] == [3, 6]
    with_them = asyncio.run(outage(watermarks=True))
    assert [len(r.instances) for r in with_them.ready_events()] == [6]


def test_a_listener_that_never_catches_up_holds_the_study_only_until_the_maximum_wait():
    world = asyncio.run(outage(watermarks=True, max_wait_s=2 * QUIET))
    # released with what came at the maximum wait, then again whole
    assert [len(r.instances) for r in world.ready_events()] == [3, 6]


def test_a_listener_gone_quiet_or_closing_holds_nothing():
    """A listener whose watermark stopped while another's went on for longer than
    ``listener_stale_after_s`` is gone; one that said it is closing has nothing left."""

    async def run(last_word: str) -> World:
        world = World(listener_stale_after_s=30.0)
        partition = Partition(world)
        world.clock.now = ACCEPTED
        await partition.watermark("old-gateway", ACCEPTED - 1, ACCEPTED - 0.5)
        await partition.publish((1, 2), ACCEPTED, ACCEPTED + 0.25)
        await partition.watermark("mr-gateway", ACCEPTED + 0.3, ACCEPTED + 0.3)
        world.clock.now += 2 * QUIET
        await world.flow.release_ready_studies()
        assert world.ready_events() == []  # old-gateway may still hold some of it
        if last_word == "closing":
            await partition.watermark("old-gateway", ACCEPTED, ACCEPTED, closing=True)
            world.clock.now += QUIET
        else:
            world.clock.now = ACCEPTED + 31
        await partition.watermark("mr-gateway", world.clock.now, world.clock.now)
        await world.flow.release_ready_studies()
        return world

    for last_word in ("closing", "others go on"):
        world = asyncio.run(run(last_word))
        assert [len(r.instances) for r in world.ready_events()] == [2], last_word


def test_a_study_waits_to_be_read_past_the_listeners_last_watermark():
    """The listener's watermark is past the quiet period, but the events it published before
    sending it are not all read yet (the worker lags): the study waits for them."""

    async def run() -> World:
        world = World()
        partition = Partition(world)
        world.clock.now = ACCEPTED
        await partition.publish((1, 2), ACCEPTED, ACCEPTED + 0.25)
        await partition.watermark("mr-gateway", ACCEPTED + 6, ACCEPTED + 6.1)
        world.ends[PARTITION] = partition.offset + 1  # instance 3 is published, not read
        world.clock.now += 2 * QUIET
        await world.flow.release_ready_studies()
        assert world.ready_events() == [] and world.asked == [PARTITION]
        await partition.publish((3,), ACCEPTED, ACCEPTED + 0.3)
        await world.flow.release_ready_studies()
        return world

    world = asyncio.run(run())
    assert [len(r.instances) for r in world.ready_events()] == [3]


def test_watermarks_move_forward_only_and_leave_with_their_partition():
    marks = ListenerWatermarks(stale_after_s=30.0)
    progress = ReadProgress()
    read = ListenerWatermarkV1.from_bytes

    def read_until(partition: int, now: float = 1041.0) -> float | None:
        return marks.read_until(partition, 1005.0, progress.read_past, now)

    marks.assigned({PARTITION, PARTITION + 1}, at=1000.0)  # no listener heard of yet: no wait
    assert read_until(PARTITION, now=1001.0) == 1005.0  # none known
    marks.record(PARTITION, read(watermark("a", 1010.0, 1010.5)))
    marks.record(PARTITION, read(watermark("a", 1001.0, 1001.5)))  # a redelivered old one
    assert read_until(PARTITION) == 1010.5
    assert read_until(PARTITION + 1) == 1005.0
    marks.record(PARTITION, read(watermark("b", 1004.0, 1004.5)))
    assert read_until(PARTITION) is None  # b is behind
    progress.read(Origin(InstanceReceivedV1.SCHEMA, PARTITION, 3), 1040.0)
    assert read_until(PARTITION) == 1010.5  # b is stale
    marks.forget({PARTITION})  # revoked
    assert read_until(PARTITION) == 1005.0
    # Listeners are known now: a partition assigned again waits for its first watermark, for
    # at most stale_after_s; one revoked meanwhile does not.
    marks.assigned({PARTITION, PARTITION + 1}, at=1050.0)
    assert read_until(PARTITION, now=1079.0) is None
    assert read_until(PARTITION + 1, now=1079.0) is None
    marks.forget({PARTITION + 1})
    assert read_until(PARTITION + 1, now=1079.0) == 1005.0
    marks.record(PARTITION, read(watermark("a", 1070.0, 1070.5)))
    assert read_until(PARTITION, now=1079.0) == 1070.5
    marks.assigned({PARTITION + 1}, at=1050.0)
    assert read_until(PARTITION + 1, now=1080.0) == 1005.0  # 30 s and no word: none there


async def rebalanced_outage(heard_before: bool, back_after: float = 10.0) -> tuple[World, float]:
    """The busiest partition's leader is killed: instances 4-6 of a study wait in the
    listener's outbox for :data:`OUTAGE` seconds, and a rebalance gives the partition to this
    worker afresh. Its watermark partition has no leader for ``back_after`` seconds (longer
    than the quiet period); then the
    listener's watermarks say it is behind until 4-6 are out. ``heard_before``: whether this
    worker had read some watermark before (listeners are known to send them). Returns the world
    and the seconds from the rebalance to the first ready event."""
    world = World()
    partition = Partition(world)
    world.clock.now = ACCEPTED
    if heard_before:
        await partition.watermark("mr-gateway", ACCEPTED - 0.5, ACCEPTED - 0.4)
    world.flow.partitions_revoked({PARTITION})
    world.flow.partitions_assigned({PARTITION})
    await partition.publish((1, 2, 3), ACCEPTED, ACCEPTED + 0.35)
    first_ready = float("inf")
    while world.clock.now < ACCEPTED + OUTAGE:
        world.clock.now += 1.0
        if world.clock.now - ACCEPTED >= back_after:  # 1-3 are out, 4-6 are not
            await partition.watermark("mr-gateway", ACCEPTED + 0.36, world.clock.now)
        await world.flow.release_ready_studies()
        if world.ready.sent and first_ready == float("inf"):
            first_ready = world.clock.now - ACCEPTED
    await partition.publish((4, 5, 6), ACCEPTED + 0.3, ACCEPTED + OUTAGE)
    world.clock.now += QUIET
    await partition.watermark("mr-gateway", world.clock.now, world.clock.now)
    await world.flow.release_ready_studies()
    return world, first_ready


def test_a_partition_assigned_in_a_rebalance_waits_for_its_first_watermark():
    """The flake the broker-leader fault test showed once (a study scored on part of its
    instances, then again): after a rebalance the worker knew no watermark for the partition
    and released the study on its quiet period, while the rest of it waited in the listener's
    outbox. Now the partition waits for a watermark, which says the listener is behind."""
    world, _ = asyncio.run(rebalanced_outage(heard_before=True))
    assert [len(r.instances) for r in world.ready_events()] == [6]
    # No watermark ever read by this worker: no listener is known, decided as before.
    world, first = asyncio.run(rebalanced_outage(heard_before=False))
    assert [len(r.instances) for r in world.ready_events()] == [3, 6] and first < 30.0
    # No watermark comes back at all: waited for stale_after_s (30 s), then decided without.
    world, first = asyncio.run(rebalanced_outage(heard_before=True, back_after=float("inf")))
    assert [len(r.instances) for r in world.ready_events()] == [3, 6] and first == 30.0


def test_an_unusable_watermark_is_dead_lettered():
    async def run() -> World:
        world = World()
        origin = Origin(ListenerWatermarkV1.SCHEMA, PARTITION, 4)
        await world.flow.watermark(b'{"listener_id": ""}', origin)
        return world

    world = asyncio.run(run())
    [(_, value)] = world.dlq[ListenerWatermarkV1.SCHEMA + ".dlq"].sent
    assert b"invalid dicom.listener.watermark.v1" in value
