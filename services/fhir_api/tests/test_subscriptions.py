"""R4 rest-hook Subscriptions: matching Observations are delivered to a real HTTP endpoint on
loopback; failed deliveries are retried and end in a visible ``status = error``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from devtools.kafka_local import free_port
from devtools.testing import wait_for as wait
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.test_search import scored, write

HEADERS = {"Content-Type": "application/fhir+json"}
DEADLINE_S = 10.0


class Receiver(ThreadingHTTPServer):
    received: list[tuple[str, str, bytes, str | None]]  # the requests it accepted
    attempts: int  # every request, accepted or not
    status: int  # what it answers


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            server: Receiver = self.server  # type: ignore[assignment]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status = server.status
            if status < 300:
                server.received.append((self.command, self.path, body, self.headers.get("X-Token")))
            server.attempts += 1
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = _record

        def log_message(self, *_args: object) -> None:
            pass

    server = Receiver(("127.0.0.1", 0), Handler)
    server.received, server.attempts, server.status = [], 0, 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def wait_for(condition: Callable[[], object], deadline_s: float = DEADLINE_S) -> object:
    return wait(condition, deadline_s, "delivery", interval=0.02)


def subscription(endpoint: str, criteria: str, payload: bool = True) -> dict:
    channel = {"type": "rest-hook", "endpoint": endpoint, "header": ["X-Token: s3cret"]}
    if payload:
        channel["payload"] = "application/fhir+json"
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "EHR notification",
        "criteria": criteria,
        "channel": channel,
    }


def test_matching_observation_is_delivered(client: TestClient, receiver: Receiver) -> None:
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    created = client.post(
        "/fhir/Subscription",
        json=subscription(endpoint, "Observation?code=anomaly-score&status=preliminary"),
        headers=HEADERS,
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "active"
    client.post(
        "/fhir/Subscription",
        json=subscription(endpoint + "2", "Observation?status=final", payload=False),
        headers=HEADERS,
    )
    start = time.monotonic()
    observation = write(client, scored("10.1"))
    wait_for(lambda: receiver.received)
    elapsed = time.monotonic() - start
    method, path, body, token = receiver.received[0]
    assert (method, path, token) == ("PUT", f"/hook/Observation/{observation['id']}", "s3cret")
    assert observation["id"].encode() in body
    print(f"delivered in {elapsed:.3f}s")  # noqa: T201 - for the record, not asserted
    assert [r[1] for r in receiver.received] == [f"/hook/Observation/{observation['id']}"]


def test_failed_delivery_is_retried_then_visible(client: TestClient) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"
    created = client.post(
        "/fhir/Subscription",
        json=subscription(dead, "Observation?status=preliminary"),
        headers=HEADERS,
    ).json()
    write(client, scored("10.2"))
    path = f"/fhir/Subscription/{created['id']}"
    failed = wait_for(lambda: (r := client.get(path).json())["status"] == "error" and r)
    assert "after 3 attempts" in failed["error"]  # type: ignore[index]
    metrics = client.get("/metrics").text
    assert 'fhir_subscription_notifications_total{outcome="retried"} 2.0' in metrics
    assert 'fhir_subscription_notifications_total{outcome="failed"} 1.0' in metrics


def test_a_notifier_stopped_while_retrying_leaves_the_delivery_to_its_successor(
    settings: Settings, issue: Callable[..., str], receiver: Receiver
) -> None:
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    auth = {"Authorization": f"Bearer {issue('system/*.read system/*.write')}", **HEADERS}
    receiver.status = 503
    slow_retries = settings.model_copy(update={"subscription_backoff_s": 60.0})
    with TestClient(create_app(slow_retries), headers=auth) as first:
        first.post(
            "/fhir/Subscription", json=subscription(endpoint, "Observation?status=preliminary")
        )
        observation = write(first, scored("10.3"))
        wait_for(lambda: receiver.attempts == 1)
    # The first process stopped during its 60 s backoff; the endpoint is back.
    receiver.status = 200
    with TestClient(create_app(settings), headers=auth):
        wait_for(lambda: receiver.received)
    assert [(r[0], r[1]) for r in receiver.received] == [
        ("PUT", f"/hook/Observation/{observation['id']}")
    ]


def test_unusable_subscriptions_are_refused(client: TestClient) -> None:
    for criteria, channel_type, endpoint in (
        ("Patient?name=x", "rest-hook", "http://127.0.0.1:1/"),
        ("Observation?colour=red", "rest-hook", "http://127.0.0.1:1/"),
        ("Observation?status=final", "email", "mailto:x@y"),
        ("Observation?status=final", "rest-hook", "ftp://x"),
    ):
        resource = subscription(endpoint, criteria)
        resource["channel"]["type"] = channel_type
        response = client.post("/fhir/Subscription", json=resource, headers=HEADERS)
        assert response.status_code == 422, (criteria, channel_type)


def test_stop_waits_for_an_outbox_read_still_running_in_its_thread(
    settings: Settings, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = {"Authorization": f"Bearer {issue('system/*.read system/*.write')}", **HEADERS}
    app = create_app(settings)
    store, manager = app.state.store, app.state.subscriptions
    reading, events = threading.Event(), []
    real_read = store.pending_changes

    def slow_read(*args: object) -> object:
        reading.set()
        wait(lambda: manager._stopping, DEADLINE_S, "stop() to begin", interval=0.01)
        changes = real_read(*args)
        events.append("read done")
        return changes

    with TestClient(app, headers=auth) as client:
        real_close = manager._lease.close
        monkeypatch.setattr(
            manager._lease, "close", lambda: (events.append("lease closed"), real_close())
        )
        monkeypatch.setattr(store, "pending_changes", slow_read)
        write(client, scored("10.4"))
        assert reading.wait(DEADLINE_S)
    # Closing the lease under the read crashed the process (SQLite) before the lease lock.
    assert events[-2:] == ["read done", "lease closed"]


def test_stop_ends_the_notifier_woken_in_the_same_instant(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings)
    with TestClient(app):  # migrates the schema
        pass
    manager = app.state.subscriptions

    async def scenario() -> None:
        await manager.start()  # the notifier task is created, not yet run
        waiting = asyncio.Event()
        real_wait = manager._wake.wait

        async def wait_and_tell() -> bool:
            waiting.set()
            return await real_wait()

        monkeypatch.setattr(manager._wake, "wait", wait_and_tell)
        # Set as the notifier starts waiting for a wake-up; seen here once it waits.
        await asyncio.wait_for(waiting.wait(), DEADLINE_S)
        assert manager._wake._waiters, "the notifier waits for a wake-up"
        manager._wake.set()  # as a delivery that just ended does
        # Python 3.11's wait_for drops a cancellation that arrives with its event set: stop()
        # then waited for a notifier that never ended.
        await asyncio.wait_for(manager.stop(), DEADLINE_S)

    asyncio.run(scenario())
    assert manager._runner is not None and manager._runner.done()
