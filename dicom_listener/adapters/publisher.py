"""Publishing events: the outbox relay and its Kafka adapter.

:class:`OutboxRelay` is a thread that drains the durable outbox to Kafka, oldest event first,
and deletes events only once Kafka acknowledged them (``acks=all``). While Kafka is unreachable
it retries with a growing pause (up to ``retry_max_s``); the events wait on disk meanwhile, and
C-STOREs keep succeeding. Delivery is at least once: an event whose acknowledgement was lost is
sent again (consumers are idempotent, DESIGN §2).

Order per study: events of one study share a key, hence a partition; the producer keeps one
request in flight per connection and the relay resends from the first unacknowledged event, so
a study's events reach the partition in the order their C-STOREs succeeded.

Publication watermark: about every ``watermark_interval_s`` the relay sends a
:class:`~schemas.ListenerWatermarkV1` to each partition of ``dicom.listener.watermark.v1``
(co-partitioned with the study-keyed topics): every event committed to the outbox before
``published_through`` has been acknowledged by Kafka. ``published_through`` is the time taken
just before a read of the outbox that saw all of it (fewer than ``batch_size`` events) and whose
events were all acknowledged: SQLite's read sees every commit that finished before it began.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from dicom_listener.adapters.outbox import Outbox, OutboxEvent
from dicom_listener.metrics import ListenerMetrics
from scanwatch import kafka
from schemas.events import InstanceReceivedV1, ListenerWatermarkV1
from schemas.topics import STUDY_PARTITIONS

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Producer

log = logging.getLogger(__name__)

#: First pause after a failed batch; it doubles up to ``retry_max_s``.
RETRY_MIN_S = 0.2
#: Longest wait for a watermark round's acknowledgement (the sink's timeout, if shorter).
WATERMARK_TIMEOUT_S = 4.0


class PublishError(RuntimeError):
    """Some events of a batch were not acknowledged; they stay in the outbox."""


class EventSink(Protocol):
    """Sends a batch of events and says which leading part of it was acknowledged."""

    def send_batch(self, events: list[OutboxEvent]) -> int:
        """Send ``events`` in order; return how many, from the first, were acknowledged.
        Raise :class:`PublishError` (after acknowledging none) when the broker is unreachable."""
        ...

    def send_watermarks(self, key: bytes, watermarks: list[tuple[int, bytes]]) -> None:
        """Send each ``(partition, value)`` of ``watermarks`` to that partition of
        ``dicom.listener.watermark.v1``, keyed ``key``; return once every one is acknowledged.
        Raise :class:`PublishError` when one is not."""
        ...

    def connect(self) -> None:
        """Get ready to send (connections, metadata) before the first event is waiting.
        Raise :class:`PublishError` when the broker is unreachable."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class KafkaSink:
    """scanwatch's librdkafka producer (:func:`scanwatch.kafka.producer_config`: ``acks=all``,
    one request in flight, not idempotent), sending whole batches with a 2 ms linger.

    One request in flight keeps the order; a request retried after a lost acknowledgement may
    write an event twice, which at-least-once delivery allows anyway. The producer is created
    on the first batch, not in ``__init__``: the listener starts (and stores instances) while
    Kafka is still down. Each Kafka wait is bounded by ``timeout_s``.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        timeout_s: float,
        client_id: str = "scanwatch-dicom-listener",
        topics: tuple[str, ...] = (InstanceReceivedV1.SCHEMA, ListenerWatermarkV1.SCHEMA),
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = timeout_s
        self.client_id = client_id
        #: Topics whose metadata :meth:`connect` fetches ahead of the first event.
        self.topics = topics
        self._producer: Producer | None = None

    def _get_producer(self) -> Producer:
        if self._producer is None:
            # A study's events go to the partition any other producer of the topic would
            # choose (scanwatch.kafka's partitioner contract).
            self._producer = kafka.new_producer(
                self.bootstrap_servers, self.client_id, self.timeout_s, **{"linger.ms": 2}
            )
        return self._producer

    def connect(self) -> None:
        """Open the producer and fetch the topics' partition metadata, which otherwise costs
        the first batch a few hundred milliseconds while C-STOREs keep arriving."""
        try:
            producer = self._get_producer()
            for topic in self.topics:
                producer.list_topics(topic, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the relay's retry loop takes over
            self._reset()
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc

    def send_batch(self, events: list[OutboxEvent]) -> int:
        # Delivery reports, filled in by flush(): None for acknowledged, else the error.
        reports: list[object] = [_NOT_REPORTED] * len(events)
        try:
            producer = self._get_producer()
            for index, e in enumerate(events):
                producer.produce(
                    e.topic,
                    value=e.value,
                    key=e.key,
                    # librdkafka's stub wants a list of str|bytes|None values (lists are
                    # invariant); ours is a list of bytes values
                    headers=cast(list[tuple[str, str | bytes | None]], e.headers) or None,
                    on_delivery=partial(_report, reports, index),
                )
            producer.flush(self.timeout_s + 1)
        except Exception as exc:  # noqa: BLE001 - any failure means "not acknowledged"
            self._reset()
            raise PublishError(f"{type(exc).__name__}: {exc}") from exc
        acked = 0
        for report in reports:
            if report is not None:
                break
            acked += 1
        if acked < len(events):
            failure = reports[acked]
            self._reset()
            if acked == 0:
                raise PublishError(
                    f"not acknowledged: {'timed out' if failure is _NOT_REPORTED else failure}"
                )
        return acked

    def send_watermarks(self, key: bytes, watermarks: list[tuple[int, bytes]]) -> None:
        # By partition number, not by key: each partition of the study-keyed topics needs its
        # own copy, read by whichever worker reads that partition.
        reports: list[object] = [_NOT_REPORTED] * len(watermarks)
        try:
            producer = self._get_producer()
            for index, (partition, value) in enumerate(watermarks):
                producer.produce(
                    ListenerWatermarkV1.SCHEMA,
                    value=value,
                    key=key,
                    partition=partition,
                    on_delivery=partial(_report, reports, index),
                )
            # Bounded shorter than a batch: a round waiting on a leaderless partition would
            # hold up the events of every other one; a late round is only retried.
            producer.flush(min(self.timeout_s, WATERMARK_TIMEOUT_S) + 1)
        except Exception as exc:  # noqa: BLE001 - any failure means "not acknowledged"
            self._reset()
            raise PublishError(f"watermark: {type(exc).__name__}: {exc}") from exc
        failures = [report for report in reports if report is not None]
        if failures:
            self._reset()
            failure = failures[0]
            raise PublishError(
                f"{len(failures)} of {len(watermarks)} watermarks not acknowledged: "
                f"{'timed out' if failure is _NOT_REPORTED else failure}"
            )

    def _reset(self) -> None:
        """Drop the producer after a failure, so that the next batch starts clean; events it
        still queues are purged (the outbox keeps them: they would be sent twice)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.purge()
                producer.flush(0)
            except Exception:  # noqa: BLE001 - a broken producer may fail here too
                pass

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(self.timeout_s)


#: A delivery report not (yet) received.
_NOT_REPORTED = object()


def _report(reports: list[object], index: int, error: KafkaError | None, _message: object) -> None:
    reports[index] = error


class OutboxRelay:
    """The publisher thread: outbox → sink, oldest first, forgetting only what was acked, and
    the publication watermark (module docstring) every ``watermark_interval_s``."""

    def __init__(
        self,
        outbox: Outbox,
        sink: EventSink,
        metrics: ListenerMetrics,
        listener_id: str,
        batch_size: int = 500,
        retry_max_s: float = 5.0,
        idle_poll_s: float = 1.0,
        linger_s: float = 0.0,
        watermark_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.sink = sink
        self.metrics = metrics
        #: Names this listener in its watermarks (``Settings.resolved_listener_id``).
        self.listener_id = listener_id
        self.batch_size = batch_size
        self.retry_max_s = retry_max_s
        self.idle_poll_s = idle_poll_s
        self.linger_s = linger_s
        self.watermark_interval_s = watermark_interval_s
        #: The wall clock of ``published_through``, the one the outbox stamps events with.
        self.clock = clock
        self._wake = threading.Event()
        self._flush = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Set while the last batch (or watermark) failed (for /healthz; not a health failure).
        self.last_error: str | None = None
        #: The latest time before which every committed event is known acknowledged (epoch
        #: seconds), and the latest one sent in a watermark; neither ever moves back.
        self._published_through: float | None = None
        self._watermark_sent: float | None = None
        #: When the relay thread tries its next watermark round (monotonic seconds).
        self._watermark_due = 0.0

    def wake(self) -> None:
        """New events are committed: send them after the linger instead of at the next poll."""
        self._wake.set()

    def flush(self) -> None:
        """A sender is done (its association ended): send what is committed now, without
        lingering for more."""
        self._flush.set()
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def drain_once(self) -> int:
        """Send one batch; return how many events were delivered. Raises PublishError.

        A read that saw the whole outbox, every event of it acknowledged, moves the watermark
        to the time just before that read."""
        before = self.clock()
        events = self.outbox.pending(self.batch_size)
        if events:
            # A C-STORE's commit may not be flushed yet (its file is sealed instead): flushed
            # here, so that no event Kafka has seen can be undone by a power cut.
            self.outbox.sync()
            started = time.perf_counter()
            try:
                acked = self.sink.send_batch(events)
            finally:
                self.metrics.publish_seconds.observe(time.perf_counter() - started)
            delivered = events[:acked]
            self.outbox.delivered([e.seq for e in delivered])
            now = time.time()
            for event in delivered:
                self.metrics.event_delivery_seconds.observe(max(0.0, now - event.created_at))
            self.metrics.events_published.inc(len(delivered))
            if acked < len(events):
                raise PublishError(
                    f"{len(events) - acked} of {len(events)} events not acknowledged"
                )
        if len(events) < self.batch_size and (
            self._published_through is None or before > self._published_through
        ):
            self._published_through = before
        return len(events)

    def send_watermark(self, closing: bool = False) -> bool:
        """Send one watermark round (a record to each partition) if the watermark moved since
        the last one, or ``closing`` (the last round; it repeats the last time when nothing
        moved). Return whether a round was sent. Raises PublishError."""
        through = self._published_through
        if through is None:
            return False
        if self._watermark_sent is not None and through <= self._watermark_sent:
            if not closing:
                return False
            through = self._watermark_sent
        # After every acknowledgement this round speaks for: its records' occurred_at.
        occurred_at = datetime.now(UTC)
        published_through = datetime.fromtimestamp(through, UTC)
        watermarks = [
            (
                partition,
                ListenerWatermarkV1(
                    listener_id=self.listener_id,
                    published_through=published_through,
                    closing=closing,
                    occurred_at=occurred_at,
                ).to_bytes(),
            )
            for partition in range(STUDY_PARTITIONS)
        ]
        self.sink.send_watermarks(self.listener_id.encode(), watermarks)
        self._watermark_sent = through
        self.metrics.watermarks_published.inc()
        return True

    def _failed(self, exc: Exception, message: str) -> None:
        """Log the first failure of a spell (the others are only counted)."""
        if self.last_error is None:
            log.warning(message, exc)
        self.last_error = str(exc)
        self.metrics.publish_failures.inc()

    def _run(self) -> None:
        pause = RETRY_MIN_S
        watermark_failing = False
        try:
            self.sink.connect()
        except PublishError as exc:
            log.info("Kafka not reachable yet; events wait in the outbox: %s", exc)
        while not self._stop.is_set():
            self._wake.clear()
            self._flush.clear()
            try:
                sent = self.drain_once()
            except Exception as exc:  # noqa: BLE001 - keep retrying; events stay on disk
                self._failed(exc, "Kafka unavailable, events kept in the outbox: %s")
                self._stop.wait(pause)
                pause = min(pause * 2, self.retry_max_s)
                continue
            if time.monotonic() >= self._watermark_due:
                # At most one round per interval, whether it had something new to say or not.
                started = time.monotonic()
                try:
                    self.send_watermark()
                except Exception as exc:  # noqa: BLE001 - retried; the events go on meanwhile
                    self._failed(exc, "watermark not acknowledged, retrying: %s")
                    watermark_failing = True
                    # Retried after the back-off, which only the watermark waits for: events
                    # committed meanwhile are sent as usual.
                    self._watermark_due = time.monotonic() + max(pause, self.watermark_interval_s)
                    pause = min(pause * 2, self.retry_max_s)
                else:
                    watermark_failing = False
                    self._watermark_due = started + self.watermark_interval_s
            if self.last_error is not None and not watermark_failing:
                log.info("Kafka reachable again, draining the outbox")
                self.last_error = None
            if not watermark_failing:
                pause = RETRY_MIN_S
            if sent < self.batch_size:
                # Caught up: sleep until a commit wakes us (or poll, for other processes; or
                # the next watermark is due), then linger a moment so that the next batch
                # carries several events, unless a flush cuts it short.
                idle_s = min(self.idle_poll_s, max(0.0, self._watermark_due - time.monotonic()))
                if self._wake.wait(idle_s) and self.linger_s:
                    self._flush.wait(self.linger_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the current batch (a final drain is attempted if Kafka is up); once that
        left the outbox empty, send a closing watermark (best effort)."""
        self._stop.set()
        self.flush()
        if self._thread is not None:
            # While Kafka is unreachable the thread may sit in a connect attempt: do not wait
            # for it (it is a daemon; the events are safe in the outbox).
            self._thread.join(timeout=timeout_s if self.last_error is None else 0.5)
            if self._thread.is_alive():
                log.warning("publisher still busy at stop; events stay in the outbox")
                return
            self._thread = None
        drained = False
        try:
            if self.last_error is None:
                while self.drain_once():
                    pass
                drained = True
        except Exception as exc:  # noqa: BLE001 - what is left stays in the outbox
            log.warning("events left in the outbox at stop: %s", exc)
        if drained:
            try:
                self.send_watermark(closing=True)
            except Exception as exc:  # noqa: BLE001 - workers find this listener gone later
                log.warning("closing watermark not sent: %s", exc)
        self.sink.close()
        self.outbox.close()


class FlushSignal:
    """ "Flush now" from the DICOM server processes to the process that runs the outbox relay.

    A datagram on an abstract Unix socket named after the outbox (Linux), sent when an
    association ends (:meth:`send`); the relay's process turns each into
    :meth:`OutboxRelay.flush` (:meth:`serve`). Without it that process finds other processes'
    events only at its next poll. Losing a signal only delays events to that poll.
    """

    def __init__(self, outbox_path: Path) -> None:
        digest = hashlib.sha256(os.fsencode(Path(outbox_path).resolve())).hexdigest()[:32]
        self.address = b"\0scanwatch-outbox-flush-" + digest.encode()
        self._out: socket.socket | None = None
        self._in: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def send(self) -> None:
        """Ask the relay to send now; never blocks or raises."""
        try:
            if self._out is None:
                self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._out.setblocking(False)
            self._out.sendto(b"!", self.address)
        except OSError:  # no relay listening (starting, restarting) or its queue is full
            pass

    def serve(self, flush: Callable[[], None]) -> bool:
        """Call ``flush`` for each signal, on a thread of its own, until :meth:`close`. False
        when the address is taken (another relay of this outbox still runs): the caller polls."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            log.warning("flush signals unavailable, polling only: %s", exc)
            return False
        self._in = sock
        self._thread = threading.Thread(
            target=self._receive, args=(sock, flush), name="flush-signals", daemon=True
        )
        self._thread.start()
        return True

    @staticmethod
    def _receive(sock: socket.socket, flush: Callable[[], None]) -> None:
        while True:
            try:
                if not sock.recv(16):
                    return
            except OSError:
                return
            flush()

    def close(self) -> None:
        for sock in (self._in, self._out):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._in = self._out = None
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
