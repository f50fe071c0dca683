"""What the listeners say they have published: their watermarks, per partition.

A listener sends each partition of ``dicom.listener.watermark.v1`` (co-partitioned with the
instance topic) a :class:`~schemas.ListenerWatermarkV1` about twice a second: every event it
committed to its outbox before ``published_through`` has been published and acknowledged, before
the watermark was sent (its ``occurred_at``). Events accepted while Kafka's leader for their
partition moves, or while the broker restarts, wait in the outbox and hold ``published_through``
back. Without watermarks, the worker would count a study's quiet period over while some of its
instances still wait there, score it on part of its slices and amend it later.

So a study whose quiet period ends at ``until`` (:func:`~inference_worker.assembly.quiet_until`)
is held while some live listener's ``published_through`` is before ``until``
(:meth:`ListenerWatermarks.read_until` says None). Once every live listener is past it, the
partition must have been read up to the newest of their watermarks' times: what they published
before then is read.

A listener is live on a partition until it says it is closing, or until events or another
listener's watermark from ``stale_after_s`` after its last watermark have been read there
(others publish on, it does not: it is gone). A broker that restarts stops events and
watermarks alike, so it makes no listener stale. A listener that died alone holds its
partitions' studies until the maximum wait.

Kept in memory only: watermarks come twice a second, so after a rebalance the next ones tell
again. Until one has come for a partition assigned here, its studies are held, for at most
``stale_after_s``: the worker that read the partition before knew what its listeners held, this
one does not, and a rebalance often comes with the broker loss that stops watermarks (a study
was released on the quiet period alone, with the rest of it still in a listener's outbox, when
the busiest partition's leader was killed). A worker that has read no watermark at all since it
started (a system without listeners: the worker's own tests and benchmarks) decides as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from schemas import ListenerWatermarkV1


@dataclass(frozen=True)
class Watermark:
    """A listener's latest word on one partition (epoch seconds, the listener's clock)."""

    published_through: float
    sent_at: float


class ListenerWatermarks:
    """Each listener's latest watermark, per partition of the study-keyed topics."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._marks: dict[int, dict[str, Watermark]] = {}
        # Partitions assigned here and when, until their first watermark is read.
        self._assigned_at: dict[int, float] = {}
        self._listeners_seen = False  # some watermark read, on any partition

    def record(self, partition: int, event: ListenerWatermarkV1) -> None:
        """Take one watermark read on ``partition``. Watermarks only move forward: one older than
        what is kept (a redelivery) changes nothing."""
        self._listeners_seen = True
        self._assigned_at.pop(partition, None)
        marks = self._marks.setdefault(partition, {})
        if event.closing:
            marks.pop(event.listener_id, None)
            return
        mark = Watermark(event.published_through.timestamp(), event.occurred_at.timestamp())
        kept = marks.get(event.listener_id)
        if kept is None or mark.published_through >= kept.published_through:
            marks[event.listener_id] = mark

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: another worker reads their watermarks now."""
        for partition in partitions:
            self._marks.pop(partition, None)
            self._assigned_at.pop(partition, None)

    def assigned(self, partitions: set[int], at: float) -> None:
        """Partitions assigned here at ``at``: what was read for them before no longer counts,
        and their studies wait for their first watermark (for at most ``stale_after_s``) if
        listeners are known to send them."""
        self.forget(partitions)
        if self._listeners_seen:
            self._assigned_at.update(dict.fromkeys(partitions, at))

    def read_until(
        self,
        partition: int,
        until: float,
        read_past: Callable[[int, float], bool | None],
        now: float,
    ) -> float | None:
        """How far ``partition`` must be read before a study quiet since ``until`` is released:
        to ``until``, and past every live listener's last watermark. None while some live
        listener may still hold an event accepted before ``until`` (it is behind), or while the
        partition, assigned here less than ``stale_after_s`` before ``now``, has had no
        watermark read yet.

        ``read_past``: whether an instance event of at least that time has been read on the
        partition (:meth:`~inference_worker.flow.ReadProgress.read_past`), which, like a later
        watermark of another listener, tells a listener gone stale."""
        assigned_at = self._assigned_at.get(partition)
        if assigned_at is not None:
            if now - assigned_at < self.stale_after_s:
                return None
            del self._assigned_at[partition]  # no listener spoke up: decided without them
        kept = self._marks.get(partition, {}).values()
        newest = max((mark.sent_at for mark in kept), default=0.0)
        marks = [
            mark
            for mark in kept
            if newest - mark.sent_at < self.stale_after_s
            and not read_past(partition, mark.sent_at + self.stale_after_s)
        ]
        if any(mark.published_through < until for mark in marks):
            return None
        return max([until, *(mark.sent_at for mark in marks)])
