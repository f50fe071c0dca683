"""The outbox relay: its timing (a flush, an association ended, sends at once; the signal that
carries it from the DICOM server processes to the publisher's process) and its publication
watermark (what it promises, when it is sent, what a failure of it does)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from devtools.testing import logged, wait_for
from dicom_listener.adapters.outbox import Outbox, OutboxEvent, OutboxTransaction
from dicom_listener.adapters.publisher import FlushSignal, OutboxRelay, PublishError
from dicom_listener.metrics import ListenerMetrics
from schemas import ListenerWatermarkV1
from schemas.topics import STUDY_PARTITIONS

LISTENER_ID = "test-host:0123456789ab"


class RecordingSink:
    """Acknowledges what it is told to (every event, by default), and records it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        #: Each watermark round: (key, [(partition, value)], time.monotonic() of the call).
        self.rounds: list[tuple[bytes, list[tuple[int, bytes]], float]] = []
        #: time.time() when the latest batch was acknowledged.
        self.acked_at = 0.0
        #: How many events of the next batches to acknowledge (None: all).
        self.ack_limit: int | None = None
        self.refuse_events = False
        self.refuse_watermarks = False
        self.watermark_attempts = 0

    def connect(self) -> None:
        pass

    def send_batch(self, events: list[OutboxEvent]) -> int:
        if self.refuse_events:
            raise PublishError("not acknowledged: broker down")
        acked = events[: self.ack_limit]
        self.sent += [e.value for e in acked]
        self.acked_at = time.time()
        return len(acked)

    def send_watermarks(self, key: bytes, watermarks: list[tuple[int, bytes]]) -> None:
        self.watermark_attempts += 1
        if self.refuse_watermarks:
            raise PublishError("1 of 4 watermarks not acknowledged: leader moving")
        self.rounds.append((key, watermarks, time.monotonic()))

    def close(self) -> None:
        pass

    def watermarks(self, index: int = -1) -> list[ListenerWatermarkV1]:
        """The records of one round, each checked to be on its partition."""
        key, records, _ = self.rounds[index]
        assert key == LISTENER_ID.encode()
        assert [partition for partition, _ in records] == list(range(STUDY_PARTITIONS))
        return [ListenerWatermarkV1.from_bytes(value) for _, value in records]

    def published_through(self, index: int = -1) -> float:
        """The round's published_through (epoch seconds), the same in each of its records."""
        times = {w.published_through.timestamp() for w in self.watermarks(index)}
        assert len(times) == 1
        return times.pop()


class CountingOutbox(Outbox):
    """Counts the relay's looks at the outbox, and notes when the latest one began."""

    looks = 0
    looked_at = 0.0

    def pending(self, limit: int) -> list[OutboxEvent]:
        self.looked_at = time.time()
        found = super().pending(limit)
        self.looks += 1
        return found


def _record(tx: OutboxTransaction, sop: str = "1.2.3") -> None:
    tx.record(sop, "a" * 64, 1, "file:///x", topic="t", key=b"k", value=sop.encode())


def _commit(outbox: Outbox, *sops: str) -> float:
    """Commit an event per SOP; return the time after the last commit returned."""
    for sop in sops:
        outbox.submit(lambda tx, sop=sop: _record(tx, sop))
    return time.time()


def _relay(outbox: Outbox, sink: RecordingSink, **options: object) -> OutboxRelay:
    return OutboxRelay(outbox, sink, ListenerMetrics(), LISTENER_ID, **options)  # type: ignore[arg-type]


def test_flush_sends_without_waiting_for_the_linger(tmp_path: Path) -> None:
    """A commit wakes the relay, which then lingers for more events (here a minute); a flush
    ends the linger, so the event goes out at once."""
    outbox = CountingOutbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink, idle_poll_s=60, linger_s=60, watermark_interval_s=60)
    outbox.on_commit(relay.wake)
    relay.start()
    try:
        assert wait_for(lambda: outbox.looks == 1, timeout=10), "the relay found nothing yet"
        outbox.submit(_record)  # wakes the relay, which lingers
        assert outbox.looks == 1 and sink.sent == []
        relay.flush()
        assert wait_for(lambda: sink.sent == [b"1.2.3"], timeout=10)
    finally:
        relay.stop(timeout_s=5)
    assert not relay.alive


def test_watermark_is_the_time_before_a_read_that_saw_the_whole_outbox(tmp_path: Path) -> None:
    outbox = CountingOutbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink)
    assert not relay.send_watermark(), "nothing is known before the outbox was read"

    before = time.time()
    assert relay.drain_once() == 0  # an empty outbox: everything committed is published
    assert relay.send_watermark()
    assert before <= sink.published_through() <= outbox.looked_at

    committed = _commit(outbox, "1.2.3", "1.2.4")
    assert relay.drain_once() == 2
    assert relay.send_watermark()
    assert sink.sent == [b"1.2.3", b"1.2.4"]
    # Every event committed before it was acknowledged before the round was sent.
    assert committed <= sink.published_through() <= outbox.looked_at
    records = sink.watermarks()
    assert all(w.listener_id == LISTENER_ID and not w.closing for w in records)
    assert all(w.occurred_at.timestamp() >= sink.acked_at for w in records)
    assert len({w.event_id for w in records}) == STUDY_PARTITIONS
    assert relay.metrics.watermarks_published._value.get() == 2

    assert not relay.send_watermark(), "nothing read since: the same watermark is not resent"


def test_no_watermark_from_a_read_that_may_have_missed_events(tmp_path: Path) -> None:
    """A full batch (``batch_size`` events) may have left newer events in the outbox."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink, batch_size=2)
    committed = _commit(outbox, "1.2.3", "1.2.4", "1.2.5")
    assert relay.drain_once() == 2
    assert not relay.send_watermark() and sink.rounds == []
    assert relay.drain_once() == 1
    assert relay.send_watermark() and sink.published_through() >= committed


def test_no_watermark_past_an_event_not_acknowledged(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink)
    relay.drain_once()
    assert relay.send_watermark()
    first = sink.published_through()

    committed = _commit(outbox, "1.2.3", "1.2.4")
    sink.ack_limit = 1
    with pytest.raises(PublishError, match="1 of 2 events not acknowledged"):
        relay.drain_once()
    assert not relay.send_watermark(), "the watermark must not pass 1.2.4"
    assert sink.published_through() == first < committed and outbox.depth() == 1

    sink.ack_limit = None
    assert relay.drain_once() == 1 and sink.sent == [b"1.2.3", b"1.2.4"]
    assert relay.send_watermark() and sink.published_through() >= committed


def test_watermarks_never_move_back(tmp_path: Path) -> None:
    """A wall clock stepped back (NTP) gives no earlier watermark; closing repeats the last."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    now = [2_000_000_000.0]
    relay = _relay(outbox, sink, clock=lambda: now[0])
    relay.drain_once()
    now[0] -= 30
    relay.drain_once()  # an earlier time than the one already known: kept as it was
    assert relay.send_watermark() and sink.published_through() == 2_000_000_000.0
    now[0] -= 30
    relay.drain_once()
    assert not relay.send_watermark()
    assert relay.send_watermark(closing=True)
    assert sink.published_through() == 2_000_000_000.0 and sink.watermarks()[0].closing
    now[0] += 61
    relay.drain_once()
    assert relay.send_watermark() and sink.published_through() == 2_000_000_001.0


def test_rounds_keep_coming_while_idle_at_most_one_per_interval(tmp_path: Path) -> None:
    """With nothing to send the relay would sleep ``idle_poll_s`` (a minute here): it wakes for
    the watermark instead. Flushes that wake it far more often send no extra rounds."""
    interval = 0.1
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink, idle_poll_s=60, watermark_interval_s=interval)
    began = time.monotonic()
    relay.start()
    try:
        wait_for(lambda: len(sink.rounds) >= 4, 10, "4 rounds from an idle relay")
        done = threading.Event()

        def flush_often() -> None:
            while not done.wait(0.001):  # a flush every millisecond until told to stop
                relay.flush()

        flusher = threading.Thread(target=flush_often, daemon=True)
        flusher.start()
        try:
            wait_for(lambda: len(sink.rounds) >= 10, 10, "10 rounds while flushed")
        finally:
            done.set()
            flusher.join()
    finally:
        relay.stop(timeout_s=5)
    elapsed = time.monotonic() - began
    assert all(w.closing for w in sink.watermarks())  # stop()'s, which need not wait
    # Rounds start at least an interval apart, the first at once: counted, not timed one by
    # one (a round descheduled between its start and the sink would look closer to the next).
    # A flush every millisecond, each waking a round, would make hundreds.
    assert len(sink.rounds[:-1]) <= elapsed / interval + 1
    through = [sink.published_through(i) for i in range(len(sink.rounds))]
    assert through == sorted(through) and len(set(through)) == len(through)


def test_stop_sends_a_closing_watermark_once_the_outbox_is_drained(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink, idle_poll_s=60, linger_s=60, watermark_interval_s=60)
    outbox.on_commit(relay.wake)
    relay.start()
    wait_for(lambda: sink.rounds, 10, "the first round")
    committed = _commit(outbox, "1.2.3")  # the relay lingers on it: the final drain sends it
    relay.stop(timeout_s=5)
    assert sink.sent == [b"1.2.3"]
    assert all(w.closing for w in sink.watermarks())
    assert not any(w.closing for i in range(len(sink.rounds) - 1) for w in sink.watermarks(i))
    assert sink.published_through() >= committed


def test_no_closing_watermark_when_events_are_left(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = _relay(outbox, sink, batch_size=1)
    _commit(outbox, "1.2.3", "1.2.4")
    sink.ack_limit = 0
    relay.stop()  # never started: only the final drain, which fails
    assert sink.rounds == [] and Outbox(outbox.path).depth() == 2


def test_a_closing_watermark_that_fails_is_only_logged(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    sink.refuse_watermarks = True
    relay = _relay(outbox, sink)
    with logged("dicom_listener.adapters.publisher") as records:
        relay.stop()
    assert sink.watermark_attempts == 1
    assert [r.getMessage() for r in records] == [
        "closing watermark not sent: 1 of 4 watermarks not acknowledged: leader moving"
    ]


def test_a_failed_watermark_loses_no_event_and_is_retried(tmp_path: Path) -> None:
    """Handled like a failed batch: logged once, retried with the back-off; events committed
    meanwhile are still published, in order, and leave the outbox only once acknowledged."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    sink.refuse_events = sink.refuse_watermarks = True
    # A back-off shorter than the interval: successful batches come between failed rounds.
    relay = _relay(outbox, sink, retry_max_s=0.05, idle_poll_s=60, watermark_interval_s=0.3)
    outbox.on_commit(relay.wake)
    with logged("dicom_listener.adapters.publisher") as records:
        relay.start()
        try:
            wait_for(lambda: sink.watermark_attempts >= 2, 10, "watermarks retried")
            sops = [f"1.2.{n}" for n in range(5)]
            _commit(outbox, *sops[:3])
            wait_for(lambda: "broker down" in (relay.last_error or ""), 10, "a batch refused")
            assert outbox.depth() == 3 and sink.sent == []

            sink.refuse_events = False  # events go; watermarks still fail
            wait_for(lambda: outbox.depth() == 0, 10, "the outbox drained")
            for sop in sops[3:]:
                _commit(outbox, sop)
                wait_for(lambda sop=sop: sop.encode() in sink.sent, 10, "the event sent")
            attempts = sink.watermark_attempts
            wait_for(lambda: sink.watermark_attempts >= attempts + 2, 10, "watermarks retried")
            assert sink.sent == [s.encode() for s in sops] and sink.rounds == []
            assert "watermarks not acknowledged" in (relay.last_error or "")
            committed = time.time()

            sink.refuse_watermarks = False
            wait_for(lambda: sink.rounds, 10, "a watermark once Kafka takes it")
            wait_for(lambda: relay.last_error is None, 10, "the relay recovered")
        finally:
            relay.stop(timeout_s=5)
    assert sink.published_through(0) >= committed
    assert sink.sent == [s.encode() for s in sops], "each event once, in order"
    warned = [r.getMessage().partition(":")[0] for r in records if r.levelname == "WARNING"]
    assert warned == ["watermark not acknowledged, retrying"]
    assert relay.metrics.publish_failures._value.get() >= 5


def test_flush_signal_reaches_the_process_that_serves_it(tmp_path: Path) -> None:
    outbox_path = tmp_path / "outbox.sqlite3"
    FlushSignal(outbox_path).send()  # nobody serves it yet: ignored, no error
    flushed = threading.Semaphore(0)
    served = FlushSignal(outbox_path)
    assert served.serve(flushed.release)
    second = FlushSignal(outbox_path)
    assert not second.serve(flushed.release), "one relay per outbox serves the signal"
    other = FlushSignal(tmp_path / "other.sqlite3")
    assert other.serve(lambda: None), "another outbox has a signal of its own"
    sender = FlushSignal(outbox_path)
    try:
        sender.send()
        sender.send()
        assert flushed.acquire(timeout=10) and flushed.acquire(timeout=10)
    finally:
        for signal in (sender, served, other):
            signal.close()
    sender.send()  # closed or not, sending never raises


def test_events_are_flushed_before_kafka_sees_them(tmp_path: Path) -> None:
    """A sealed C-STORE's commit is not flushed when it is answered (``test_placements``); the
    relay flushes the outbox before it sends, so no event Kafka has can be undone by a power
    cut. Storage Commitment's lookup flushes what it reports too."""
    order: list[str] = []

    class FlushOrder(Outbox):
        def sync(self) -> None:
            order.append("flush")
            super().sync()

    class SendOrder(RecordingSink):
        def send_batch(self, events: list[OutboxEvent]) -> int:
            order.append("send")
            return super().send_batch(events)

    outbox = FlushOrder(tmp_path / "outbox.sqlite3")
    outbox.submit(lambda tx: _record(tx, "1.2.2"))
    assert order == ["flush"]  # a commit is flushed unless its request says otherwise
    del order[:]
    outbox.submit(lambda tx: (tx.rebuildable(), _record(tx, "1.2.3")))
    assert order == []
    relay = _relay(outbox, SendOrder())
    assert relay.drain_once() == 2
    assert order == ["flush", "send"]
    assert relay.drain_once() == 0 and order == ["flush", "send"]  # nothing to send: no flush
    outbox.submit(lambda tx: _record(tx, "1.2.4"))
    assert outbox.stored(["1.2.4"]) == {"1.2.4": "file:///x"}
    assert order[-1] == "flush"
