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
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
from sqlalchemy import or_

from services.fhir_api.errors import INVALID, FhirError
from services.fhir_api.search import parse_search
from services.fhir_api.store import ResourceStore, ResourceVersion, Stored

log = logging.getLogger(__name__)

#: Resource types a Subscription's criteria may name.
CRITERIA_TYPES = ("Observation",)
PAYLOAD_TYPES = ("application/fhir+json", "application/json")
REST_HOOK = "rest-hook"


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
    """Matches written resources against active Subscriptions and delivers notifications."""

    def __init__(
        self,
        store: ResourceStore,
        max_attempts: int,
        backoff_s: float,
        timeout_s: float,
        counter: Any = None,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.counter = counter
        self._subscriptions: dict[str, ActiveSubscription] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        await asyncio.to_thread(self.reload)

    async def stop(self) -> None:
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
        """Called (from any thread) after every new version is stored."""
        if self._loop is None:
            return
        if stored.resource_type == "Subscription":
            self._loop.call_soon_threadsafe(self._spawn, self._reload_async())
            return
        if stored.deleted:
            return
        for subscription in list(self._subscriptions.values()):
            if subscription.resource_type == stored.resource_type:
                self._loop.call_soon_threadsafe(
                    self._spawn, self._notify_if_matching(subscription, stored)
                )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_async(self) -> None:
        await asyncio.to_thread(self.reload)

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
