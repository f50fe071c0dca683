"""The wired Faust app: its agents driven with Faust's test contexts and the memory:// store
(as lsst-sqre/kafka-aggregator tests its agents); no broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faust.transport.producer import ProducerBuffer
from faust.types import TP
from faust.types.tuples import Message

from devtools.kafka_local import free_port
from inference_worker.app import STUDY_TABLE, _origin, create_app, drain_on_flush
from inference_worker.config import Settings
from inference_worker.study_store import StudyStore
from inference_worker.tests.test_worker_assembly import received
from inference_worker.tests.test_worker_flow import result_for
from schemas import InferenceResultV1, InstanceReceivedV1, StudyReadyV1

STUDY = "1.2.826.0.1.3680043.8.498.8"
KEY = STUDY.encode()


class FakeModel:
    image_size = 32

    async def check_signature(self) -> int:
        return 32


class FakeScorer:
    def __init__(self) -> None:
        self.model = FakeModel()
        self.scored: list[StudyReadyV1] = []

    async def score(self, ready: StudyReadyV1) -> InferenceResultV1:
        self.scored.append(ready)
        return result_for(ready)


def offline_app(tmp_path: Path) -> tuple[Any, Any, FakeScorer]:
    """The worker's app with a fake scorer and the memory store, its table and its scorer. No
    broker listens at its address: the producer of a dead letter or a result reaches none."""
    scorer = FakeScorer()
    nowhere = f"127.0.0.1:{free_port()}"
    settings = Settings(store="memory://", data_dir=tmp_path, kafka_bootstrap_servers=nowhere)
    app = create_app(settings, scorer=scorer)
    app.conf.table_standby_replicas = 0
    return app, app.tables[STUDY_TABLE], scorer


def test_agents_assemble_into_the_table_and_score_ready_events(tmp_path: Path):
    app, table, scorer = offline_app(tmp_path)

    def studies() -> StudyStore:
        """The table read as a restarted worker would read it (the app's store is its own)."""
        return StudyStore(table)

    async def run() -> None:
        async with app.agents["assemble"].test_context() as assemble:
            for n in (1, 2, 2):  # the redelivered instance changes nothing
                await assemble.put(received(n, study=STUDY).to_bytes(), key=KEY)
            await assemble.put(b"not an event", key=b"junk")  # dead-lettered, not stored
        assert set(studies()) == {KEY}
        assert len(table) == 3  # the study's header and one entry per instance
        state = studies()[KEY]
        assert len(state["instances"]) == 2 and state["announced"] == 0
        ready = StudyReadyV1(
            StudyInstanceUID=STUDY,
            instances=[received(n, study=STUDY).ref() for n in (1, 2)],
            first_received_at="2026-01-01T00:00:00Z",
            last_received_at="2026-01-01T00:00:01Z",
            quiet_period_s=5,
        )
        async with app.agents["score"].test_context() as score:
            await score.put(ready.to_bytes(), key=KEY)
        assert [len(r.instances) for r in scorer.scored] == [2]
        assert studies()[KEY]["announced"] == 2

    asyncio.run(run())


def test_the_study_store_reads_the_table_again_once_a_recovery_restored_it(tmp_path: Path):
    """A rebalance restores the table from its changelog behind the app's store (here: the
    memory store written directly, as recovery does): its recovery callback makes the store
    read the table again, so the flow sees the restored study (announced with 3 instances
    elsewhere: a ready event with 2 is then superseded), not what it had cached."""
    app, table, scorer = offline_app(tmp_path)
    ready = StudyReadyV1(
        StudyInstanceUID=STUDY,
        instances=[received(n, study=STUDY).ref() for n in (1, 2)],
        first_received_at="2026-01-01T00:00:00Z",
        last_received_at="2026-01-01T00:00:01Z",
        quiet_period_s=5,
    )

    async def run() -> None:
        async with app.agents["assemble"].test_context() as assemble:
            for n in (1, 2):
                await assemble.put(received(n, study=STUDY).to_bytes(), key=KEY)
        restored = {**table.data[KEY], "announced": 3}  # another worker's later write
        table.data[KEY] = restored
        await table.call_recover_callbacks()
        async with app.agents["score"].test_context() as score:
            await score.put(ready.to_bytes(), key=KEY)

    asyncio.run(run())
    assert scorer.scored == []  # superseded: the store read the restored header


def test_a_flush_waits_until_the_producer_buffer_is_sent(tmp_path: Path):
    """Faust commits an event's offset after flushing its producer, so that the table writes
    made for the event are on Kafka first. Its buffer's own flush gave up after 0.1 s without
    progress (a changelog partition's leader down) and the offset was committed without them;
    the app's buffer waits until every queued message is handed on."""
    app, _, _ = offline_app(tmp_path)
    release = asyncio.Event()

    async def sends_held(drained: bool) -> tuple[bool, int, list[int]]:
        """Three messages put while sending is held: whether a flush had returned after
        0.5 s, how many were still queued then, and what was sent once sending resumed."""
        buffer = ProducerBuffer()
        buffer.app = app
        sent: list[int] = []

        async def send(fut: Any) -> None:
            await release.wait()
            sent.append(fut)

        buffer._send_pending = send  # type: ignore[method-assign]
        if drained:
            drain_on_flush(buffer)
        release.clear()
        await buffer.start()
        try:
            for n in range(3):
                buffer.put(n)  # type: ignore[arg-type]
            flushing = asyncio.ensure_future(buffer.flush())
            done, _ = await asyncio.wait({flushing}, timeout=0.5)
            queued = buffer.size
            release.set()
            await asyncio.wait_for(flushing, 10)
            await asyncio.wait_for(buffer.flush(), 10)
            return bool(done), queued, sent
        finally:
            await buffer.stop()

    async def run() -> None:
        # Faust's own flush: returned with messages still queued.
        returned, queued, _ = await sends_held(drained=False)
        assert returned and queued > 0
        # The app's: still waiting, and it returns once all three are sent, in order.
        returned, queued, sent = await sends_held(drained=True)
        assert not returned and queued > 0
        assert sent == [0, 1, 2]

    asyncio.run(run())


def test_a_records_timestamp_reaches_the_flow_in_seconds():
    """The quiet period counts from the record's timestamp (the listener's publication,
    ``assembly.event_time``): Faust's message gives it in seconds; a record without one
    (aiokafka: None, or -1 ms) gives None, and acceptance time counts."""

    def origin(timestamp: float | None) -> Any:
        message = Message("t", 3, 42, timestamp, 0, [("h", b"v")], b"k", b"{}", None)  # type: ignore[arg-type]
        return _origin(type("Event", (), {"message": message})())

    stamped = origin(1_796_523_420.25)
    assert (stamped.partition, stamped.offset, stamped.key) == (3, 42, b"k")
    assert stamped.headers == (("h", b"v"),)
    assert stamped.timestamp == 1_796_523_420.25
    assert origin(None).timestamp is None
    assert origin(-0.001).timestamp is None


def test_a_partition_never_committed_is_read_again_from_its_beginning(tmp_path: Path):
    """After a rebalance, Faust seeks each stream partition to its committed offset, which
    also undoes what was fetched but dropped meanwhile; a partition with none stayed where the
    fetcher was, past records never handed on (three instances lost in the broker-leader
    test). Such a partition now starts from its beginning; a committed one and the changelog
    (whose position recovery keeps) are left to Faust."""
    app, table, _ = offline_app(tmp_path)
    instances = InstanceReceivedV1.SCHEMA
    changelog = table.changelog_topic.get_topic_name()
    committed = {TP(instances, 0): None, TP(instances, 1): 0, TP(instances, 2): 5}
    committed[TP(changelog, 0)] = None

    class Thread:
        started_over: list[TP] = []

        async def seek_to_committed(self) -> dict[TP, int | None]:
            return committed

        async def seek_to_beginning(self, *partitions: TP) -> None:
            self.started_over += partitions

    thread = Thread()
    app.consumer._thread = thread
    asyncio.run(app.consumer.perform_seek())
    assert thread.started_over == [TP(instances, 0), TP(instances, 1)]
    assert app.consumer._read_offset[TP(instances, 2)] == 5  # Faust's own seek, unchanged
