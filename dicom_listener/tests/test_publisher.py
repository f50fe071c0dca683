"""The outbox relay's timing: a flush (an association ended) sends at once, and the signal
that carries it from the DICOM server processes to the publisher's process."""

from __future__ import annotations

import threading
from pathlib import Path

from devtools.testing import wait_for
from dicom_listener.adapters.outbox import Outbox, OutboxEvent, OutboxTransaction
from dicom_listener.adapters.publisher import FlushSignal, OutboxRelay
from dicom_listener.metrics import ListenerMetrics


class RecordingSink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def connect(self) -> None:
        pass

    def send_batch(self, events: list[OutboxEvent]) -> int:
        self.sent += [e.value for e in events]
        return len(events)

    def close(self) -> None:
        pass


class CountingOutbox(Outbox):
    """Counts the relay's looks at the outbox."""

    looks = 0

    def pending(self, limit: int) -> list[OutboxEvent]:
        found = super().pending(limit)
        self.looks += 1
        return found


def _record(tx: OutboxTransaction) -> None:
    tx.record("1.2.3", "a" * 64, 1, "file:///x", topic="t", key=b"k", value=b"event")


def test_flush_sends_without_waiting_for_the_linger(tmp_path: Path) -> None:
    """A commit wakes the relay, which then lingers for more events (here a minute); a flush
    ends the linger, so the event goes out at once."""
    outbox = CountingOutbox(tmp_path / "outbox.sqlite3")
    sink = RecordingSink()
    relay = OutboxRelay(outbox, sink, ListenerMetrics(), idle_poll_s=60, linger_s=60)
    outbox.on_commit(relay.wake)
    relay.start()
    try:
        assert wait_for(lambda: outbox.looks == 1, timeout=10), "the relay found nothing yet"
        outbox.submit(_record)  # wakes the relay, which lingers
        assert outbox.looks == 1 and sink.sent == []
        relay.flush()
        assert wait_for(lambda: sink.sent == [b"event"], timeout=10)
    finally:
        relay.stop(timeout_s=5)
    assert not relay.alive


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
