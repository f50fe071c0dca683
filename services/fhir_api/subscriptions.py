"""R4 Subscriptions with the rest-hook channel: when a resource is written that matches an
active Subscription's ``criteria`` (``Observation?code=...``), the server notifies
``channel.endpoint``.

Following R4 (and HAPI FHIR): without ``channel.payload`` the notification is an empty
``POST [endpoint]``; with ``payload = application/fhir+json`` the resource is sent with
``PUT [endpoint]/[type]/[id]``. ``channel.header`` entries (``Name: value``) are sent along.

A failed delivery is retried with exponential backoff; after the last attempt the
Subscription becomes ``status = error`` with ``error`` saying why (a new version, visible to
the client with a read), and it receives no more notifications until a client sets it back to
``requested`` or ``active``. Delivery counts are in ``/metrics``.

Several API processes may serve one database; exactly one of them notifies. Every write adds a
``resource_change`` row in its own transaction (the outbox, whichever process took the write);
the notifier is the process holding a PostgreSQL session advisory lock (tried again every
``poll_s`` by the others, so one takes over within that time when the holder dies). It reads
the changes in order and starts their deliveries; a change's row is deleted once every
delivery it caused has ended (delivered, or the Subscription set to ``error``). It is woken at
once by writes its own process takes and polls for the others'. On SQLite there is one
process, which is always the notifier. A change is delivered at least once: whatever a
notifier had not finished when it stopped, retries included, its successor (or itself, once
restarted) delivers again.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import httpx
from sqlalchemy import func, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from services.fhir_api.errors import INVALID, FhirError
from services.fhir_api.models import ResourceChange, ResourceVersion
from services.fhir_api.resources import Stored
from services.fhir_api.search import parse_search
from services.fhir_api.store import ResourceStore

log = logging.getLogger(__name__)

#: Resource types a Subscription's criteria may name.
CRITERIA_TYPES = ("Observation",)
PAYLOAD_TYPES = ("application/fhir+json", "application/json")
REST_HOOK = "rest-hook"
#: PostgreSQL advisory lock held by the one notifier process (any fixed 64-bit key).
NOTIFIER_LOCK_KEY = 0x7363_616E_6E6F_7466  # "scannotf"
#: Changes read from the outbox at a time.
CHANGE_BATCH = 200
#: Changes whose deliveries may run at once (an endpoint that is down keeps them retrying);
#: past this, new changes wait in the outbox.
MAX_IN_FLIGHT = 1000


T = TypeVar("T")


def _using_lease(method: Callable[..., T]) -> Callable[..., T]:
    """Run ``method`` (blocking, in a thread) holding the manager's lease lock: the lease
    connection is used by one thread at a time and never closed under one still using it.
    ``stop()`` cancels the task awaiting a thread, not the thread: without the lock, it closed
    the connection under a running outbox read (a segfault in SQLite)."""

    @functools.wraps(method)
    def locked(self: SubscriptionManager, *args: Any, **kwargs: Any) -> T:
        with self._lease_lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass(frozen=True)
class ActiveSubscription:
    id: str
    resource_type: str
    criteria: list[tuple[str, str]]
    endpoint: str
    payload: str | None
    headers: dict[str, str]


def check_subscription(resource: dict[str, Any]) -> dict[str, Any]:
    """422 unless the Subscription is one this server can honour; ``requested`` becomes
    ``active`` (R4: the server activates a subscription it accepts)."""
    criteria = resource.get("criteria") or ""
    resource_type, _, query = criteria.partition("?")
    problems = []
    if resource_type not in CRITERIA_TYPES:
        problems.append(f"Subscription.criteria must be on {', '.join(CRITERIA_TYPES)}")
    else:
        try:
            parsed = parse_search(resource_type, parse_qsl(query, keep_blank_values=True), 1, 1)
        except FhirError as exc:
            problems.append(f"Subscription.criteria: {exc}")
        else:
            if parsed.includes or parsed.revincludes:
                problems.append("Subscription.criteria takes search parameters only")
    channel = resource.get("channel") or {}
    if channel.get("type") != REST_HOOK:
        problems.append(f"Subscription.channel.type must be {REST_HOOK}")
    endpoint = channel.get("endpoint") or ""
    if not endpoint.startswith(("http://", "https://")):
        problems.append("Subscription.channel.endpoint must be an http(s) URL")
    if channel.get("payload") and channel["payload"] not in PAYLOAD_TYPES:
        problems.append(f"Subscription.channel.payload must be one of {', '.join(PAYLOAD_TYPES)}")
    for header in channel.get("header") or []:
        if ":" not in header:
            problems.append("Subscription.channel.header entries are 'Name: value'")
    if problems:
        raise FhirError(422, problems, INVALID)
    if resource.get("status") == "requested":
        resource = copy.deepcopy(resource) | {"status": "active"}
        resource.pop("error", None)
    return resource


def _active(stored: Stored) -> ActiveSubscription | None:
    resource = stored.resource()
    if resource.get("status") != "active":
        return None
    resource_type, _, query = resource["criteria"].partition("?")
    channel = resource["channel"]
    headers = {}
    for header in channel.get("header") or []:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    return ActiveSubscription(
        stored.resource_id,
        resource_type,
        parse_qsl(query, keep_blank_values=True),
        channel["endpoint"],
        channel.get("payload"),
        headers,
    )


class SubscriptionManager:
    """Matches written resources against active Subscriptions and delivers notifications, in
    the one process that holds the notifier lock (module docstring)."""

    def __init__(
        self,
        store: ResourceStore,
        max_attempts: int,
        backoff_s: float,
        timeout_s: float,
        counter: Any = None,
        poll_s: float = 0.5,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.counter = counter
        self.poll_s = poll_s
        self._subscriptions: dict[str, ActiveSubscription] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        # The connection that holds the notifier lock and reads the outbox (None: not leader).
        self._lease: Connection | None = None
        self._lease_lock = threading.Lock()
        self._stopping = False
        # Outbox rows whose deliveries run, or ended and are not deleted yet; those that ended
        # (deleted by the next round, on the lease connection).
        self._in_flight: set[int] = set()
        self._finished: deque[int] = deque()

    @property
    def is_notifier(self) -> bool:
        """Whether this process is the one that delivers notifications."""
        return self._lease is not None

    async def start(self) -> None:
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        await asyncio.to_thread(self._try_lead)
        self._runner = self._loop.create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        # Waits for an outbox read still running in its thread (see _using_lease).
        await asyncio.to_thread(self._resign)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def reload(self) -> None:
        _total, rows = self.store.search("Subscription", [], [ResourceVersion.pk], 10_000, 0, 0)
        subscriptions = {}
        for stored in rows:
            if (active := _active(stored)) is not None:
                subscriptions[active.id] = active
        self._subscriptions = subscriptions

    def resource_written(self, stored: Stored) -> None:
        """Called (from any thread) after every new version this process stored: the change
        is in the outbox already; wake the notifier if it runs here."""
        if self._loop is not None and self._lease is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- leadership and the outbox ----------------------------------------------------------

    @_using_lease
    def _try_lead(self) -> None:
        """Become the notifier if no other process is (blocking; runs in a thread)."""
        if self._lease is not None:
            return
        connection = self.store.connect()
        try:
            if self.store.backend == "postgresql":
                # A session lock: held while this connection lives (a dead process's is
                # released by PostgreSQL when its connection closes).
                locked = connection.execute(
                    select(func.pg_try_advisory_lock(NOTIFIER_LOCK_KEY))
                ).scalar_one()
                if not locked:
                    connection.close()
                    return
        except DBAPIError:
            connection.invalidate()
            connection.close()
            raise
        self._lease = connection
        self.reload()
        log.info("this process delivers subscription notifications")

    @_using_lease
    def _resign(self) -> None:
        if self._lease is None:
            return
        lease, self._lease = self._lease, None
        # Close the DBAPI connection rather than return it to the pool with the lock held.
        lease.invalidate()
        lease.close()

    async def _run(self) -> None:
        reachable = True
        # Checks _stopping as well as being cancelled: Python 3.11's wait_for loses a
        # cancellation that arrives as the event it waits for is set (a delivery that just
        # ended), and stop() then waited for ever.
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            if self._stopping:
                return
            self._wake.clear()
            try:
                if self._lease is None:
                    await asyncio.to_thread(self._try_lead)
                if self._lease is not None:
                    while await asyncio.to_thread(self._handle_changes):
                        pass
                reachable = True
            except DBAPIError as exc:
                # The database went away: whoever holds the lock next carries on (once per
                # outage in the log, not once per poll).
                if reachable:
                    log.warning(
                        "subscription notifier cannot reach the database",
                        extra={"error": type(exc.orig).__name__},
                    )
                reachable = False
                await asyncio.to_thread(self._resign)
            except Exception:
                # A fault here must not end notifications for the life of the process: the
                # changes stay in the outbox and the next round tries again.
                log.exception("subscription notifier failed; retrying")

    @_using_lease
    def _handle_changes(self) -> bool:
        """Forget the changes whose deliveries ended, start the deliveries of the next batch
        (forgetting at once the changes no one subscribed to); whether there may be more
        (blocking; runs in a thread)."""
        assert self._lease is not None and self._loop is not None
        if finished := [self._finished.popleft() for _ in range(len(self._finished))]:
            self.store.forget_changes(finished, self._lease)
            self._in_flight.difference_update(finished)
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return False  # back-pressure: new changes wait in the outbox
        # No cursor: SQLite reuses the keys of deleted rows, and PostgreSQL commits keys out of
        # order. The oldest rows, as many more as are in flight, hold every new one due.
        read = self.store.pending_changes(CHANGE_BATCH + len(self._in_flight), self._lease)
        changes = [c for c in read if c.pk not in self._in_flight]
        handled = []
        for change in changes:
            assert change.pk is not None
            if change.resource_type == "Subscription":
                self.reload()  # in order: it applies to the changes after it
                handled.append(change.pk)
                continue
            subscriptions = [
                s for s in self._subscriptions.values() if s.resource_type == change.resource_type
            ]
            if subscriptions:
                self._in_flight.add(change.pk)
                self._loop.call_soon_threadsafe(
                    self._spawn, self._notify_change(subscriptions, change), change.pk
                )
            else:
                handled.append(change.pk)
        if handled:
            self.store.forget_changes(handled, self._lease)
        return len(changes) >= CHANGE_BATCH

    async def _notify_change(
        self, subscriptions: list[ActiveSubscription], change: ResourceChange
    ) -> None:
        stored = await asyncio.to_thread(
            self.store.vread, change.resource_type, change.resource_id, change.version_id
        )
        if stored is None or stored.deleted:
            return
        await asyncio.gather(*(self._notify_if_matching(s, stored) for s in subscriptions))

    def _spawn(self, coroutine: Any, change_pk: int) -> None:
        if self._stopping:  # read just before stop(): the change stays in the outbox
            coroutine.close()
            self._in_flight.discard(change_pk)
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._delivered(done, change_pk))

    def _delivered(self, task: asyncio.Task[None], change_pk: int) -> None:
        """A change's deliveries ended: its row goes with the next batch. One cancelled (the
        notifier stops) or failed (the database went away) keeps its row for whoever notifies
        next."""
        self._tasks.discard(task)
        if task.cancelled():
            self._in_flight.discard(change_pk)
            return
        if (error := task.exception()) is not None:
            log.error("notification interrupted; it is tried again", exc_info=error)
            self._in_flight.discard(change_pk)
            return
        self._finished.append(change_pk)  # still in flight until its row is deleted
        self._wake.set()

    def _matches(self, subscription: ActiveSubscription, stored: Stored) -> bool:
        query = parse_search(subscription.resource_type, subscription.criteria, 1, 1)
        query.where.append(or_(ResourceVersion.resource_id == stored.resource_id))  # type: ignore[arg-type]
        _total, found = self.store.search(
            subscription.resource_type, query.where, query.order_by, 1, 0, 0
        )
        return bool(found)

    async def _notify_if_matching(self, subscription: ActiveSubscription, stored: Stored) -> None:
        if not await asyncio.to_thread(self._matches, subscription, stored):
            return
        assert self._client is not None
        delay = self.backoff_s
        reason = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                if subscription.payload:
                    response = await self._client.put(
                        f"{subscription.endpoint.rstrip('/')}/{stored.key}",
                        content=stored.content,
                        headers={**subscription.headers, "Content-Type": "application/fhir+json"},
                    )
                else:
                    response = await self._client.post(
                        subscription.endpoint, headers=subscription.headers
                    )
                if response.status_code < 300:
                    self._count("delivered")
                    log.info(
                        "notification delivered",
                        extra={"subscription": subscription.id, "attempt": attempt},
                    )
                    return
                reason = f"endpoint answered HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}"
            self._count("retried" if attempt < self.max_attempts else "failed")
            log.warning(
                "notification not delivered",
                extra={"subscription": subscription.id, "attempt": attempt, "reason": reason},
            )
            if attempt < self.max_attempts:
                await asyncio.sleep(delay)
                delay *= 2
        await asyncio.to_thread(self._mark_error, subscription.id, reason)

    def _mark_error(self, subscription_id: str, reason: str) -> None:
        current = self.store.read("Subscription", subscription_id)
        if current is None or current.deleted:
            return
        resource = {k: v for k, v in current.resource().items() if k != "meta"}
        meta = {
            k: v
            for k, v in (current.resource().get("meta") or {}).items()
            if k not in ("versionId", "lastUpdated")
        }
        if meta:
            resource["meta"] = meta
        resource["status"] = "error"
        resource["error"] = f"delivery failed after {self.max_attempts} attempts: {reason}"
        self.store.put(resource)
        self._subscriptions.pop(subscription_id, None)

    def _count(self, outcome: str) -> None:
        if self.counter is not None:
            self.counter.labels(outcome).inc()
