"""The patient channel's checks (connectors/patient.py) and the conversation store
(connectors/tracker_store.py), in process: tokens verified against a JWKS served over real
HTTP, the grants it accepts, the sender it derives, the rate limit; a stored conversation holds
no token, and the purge removes what is older than the retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
from connectors.patient import PatientInput, RateLimiter, check_patient_grant
from connectors.tracker_store import PatientTrackerStore, parse_retention_days
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from scanwatch.ids import chat_sender_id
from services.auth.scopes import AuthError, Grant, Scope, parse_scopes
from services.auth.tokens import KeySet, TokenService

PATIENT_SCOPES = "patient/*.read patient/CommunicationRequest.write"


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return KeySet.generate()


@pytest.fixture(scope="module")
def jwks_url(keys: KeySet) -> Iterator[str]:
    body = json.dumps(keys.public_jwks()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/auth/jwks"
    server.shutdown()


def channel(jwks_url: str) -> PatientInput:
    return PatientInput.from_credentials({"jwks_url": jwks_url})


def token(
    keys: KeySet, scope: str = PATIENT_SCOPES, patient: str | None = "p-1", **kw: object
) -> str:
    return TokenService(keys).issue("portal", parse_scopes(scope), patient, **kw)[0]  # type: ignore[arg-type]


def authenticate(jwks_url: str, header: str | None) -> tuple[str, str]:
    return asyncio.run(channel(jwks_url).authenticate(header))


def test_a_patient_token_is_accepted_and_names_the_patient(keys: KeySet, jwks_url: str) -> None:
    signed = token(keys)
    assert authenticate(jwks_url, f"Bearer {signed}") == (signed, "p-1")


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda keys: None, 401),  # no header
        (lambda keys: "Basic abc", 401),
        (lambda keys: "Bearer not-a-jwt", 401),
        (lambda keys: f"Bearer {token(KeySet.generate())}", 401),  # a key the server never had
        (lambda keys: f"Bearer {token(keys, lifetime=timedelta(seconds=-120))}", 401),  # expired
        (lambda keys: f"Bearer {token(keys, audience='another-service')}", 401),
        (lambda keys: f"Bearer {token(keys, patient=None)}", 403),  # not bound to a patient
        (lambda keys: f"Bearer {token(keys, scope='patient/Observation.read')}", 403),  # too narrow
        (lambda keys: f"Bearer {token(keys, scope='system/*.read')}", 403),  # not a patient's
    ],
)
def test_every_other_token_is_refused(keys: KeySet, jwks_url: str, make, status: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthError) as refused:
        authenticate(jwks_url, make(keys))
    assert refused.value.status == status


def test_a_token_tampered_with_is_refused(keys: KeySet, jwks_url: str) -> None:
    head, claims, signature = token(keys, patient="p-1").split(".")
    other = token(keys, patient="p-2").split(".")[1]
    with pytest.raises(AuthError) as refused:
        authenticate(jwks_url, f"Bearer {head}.{other}.{signature}")
    assert refused.value.status == 401


def test_a_system_scope_beside_the_patient_scopes_is_refused() -> None:
    """A token that could read outside the compartment would let the bot read other patients."""
    grant = Grant("x", (*parse_scopes(PATIENT_SCOPES), Scope.parse("system/Observation.read")), "p")
    with pytest.raises(AuthError):
        check_patient_grant(grant)
    assert check_patient_grant(Grant("x", parse_scopes(PATIENT_SCOPES), "p")) == "p"


def test_the_sender_comes_from_the_patient_and_hides_the_id() -> None:
    assert chat_sender_id("p-1") == chat_sender_id("p-1") != chat_sender_id("p-2")
    assert chat_sender_id("p-1").startswith("patient-") and "p-1" not in chat_sender_id("p-1")


def test_the_rate_limit_is_per_patient_and_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0  # another patient has their own bucket
    now[0] += 1.0
    assert limiter.take("a") == 0
    with pytest.raises(ValueError):
        RateLimiter(rate_per_minute=0)


def test_a_stored_conversation_holds_no_token_and_expires(tmp_path: Path) -> None:
    database = tmp_path / "conversations.db"
    store = PatientTrackerStore(host=f"sqlite:///{database}", retention_days=30)
    old = time.time() - 31 * 86_400
    tracker = DialogueStateTracker.from_events(
        "patient-abc",
        [
            SlotSet("session_started_metadata", {"access_token": "SECRET0", "patient": "p"}),
            UserUttered("an old question", metadata={"access_token": "SECRET1"}, timestamp=old),
            ActionExecuted("action_listen"),
            UserUttered(
                "what did my scan show?", metadata={"access_token": "SECRET2", "patient": "p"}
            ),
        ],
    )
    asyncio.run(store.save(tracker))
    with sqlite3.connect(database) as db:
        rows = [json.loads(data) for (data,) in db.execute("SELECT data FROM events")]
    assert "SECRET" not in json.dumps(rows)
    assert rows[-1]["metadata"] == {"patient": "p"} and rows[-1]["text"] == "what did my scan show?"
    # The in-memory tracker the action server gets still has the token.
    assert tracker.latest_message.metadata["access_token"] == "SECRET2"
    assert store.purge() == 1
    with sqlite3.connect(database) as db:
        texts = [json.loads(d).get("text") for (d,) in db.execute("SELECT data FROM events")]
    assert "an old question" not in texts and "what did my scan show?" in texts
    # Restarted with the same database: nothing is older than the retention any more.
    assert PatientTrackerStore(host=f"sqlite:///{database}", retention_days=30).purged == 0


@pytest.mark.parametrize("bad", ["0", "-3", "thirty", ""])
def test_the_retention_must_be_whole_days(bad: str) -> None:
    with pytest.raises(ValueError, match="SCANWATCH_CHAT_RETENTION_DAYS"):
        parse_retention_days(bad)


def test_the_tracker_store_needs_a_database_url() -> None:
    with pytest.raises(ValueError, match="SCANWATCH_CHAT_DB_URL"):
        PatientTrackerStore(host="", retention_days=30)


def test_a_cached_conversation_is_read_again_when_the_database_moved_on(tmp_path: Path) -> None:
    """Two Rasa replicas on one database: each sees the other's messages."""
    url = f"sqlite:///{tmp_path / 'conversations.db'}"
    domain = Domain.empty()
    first, second = (
        PatientTrackerStore(domain=domain, host=url, retention_days=30) for _ in range(2)
    )
    tracker = DialogueStateTracker.from_events("patient-abc", [UserUttered("one")])
    asyncio.run(first.save(tracker))
    assert asyncio.run(first.retrieve("patient-abc")) is tracker  # from memory
    elsewhere = asyncio.run(second.retrieve("patient-abc"))
    assert elsewhere is not None and elsewhere is not tracker
    elsewhere.update(UserUttered("two"))
    asyncio.run(second.save(elsewhere))
    again = asyncio.run(first.retrieve("patient-abc"))
    assert again is not tracker
    assert [e.text for e in again.events if isinstance(e, UserUttered)] == ["one", "two"]
    # A tracker changed in memory but never saved is not served from the cache either.
    again.update(UserUttered("unsaved"))
    fresh = asyncio.run(first.retrieve("patient-abc"))
    assert "unsaved" not in [e.text for e in fresh.events if isinstance(e, UserUttered)]


def test_saving_a_cached_conversation_appends_its_new_events_without_counting(
    tmp_path: Path,
) -> None:
    """The tracker retrieve gave out, grown by a message, is saved by appending what is new
    (no query counts the stored events); the token is still left out, and the cache still
    matches the database."""
    database = tmp_path / "conversations.db"
    store = PatientTrackerStore(
        domain=Domain.empty(), host=f"sqlite:///{database}", retention_days=30
    )
    statements: list[str] = []
    connections: list[object] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    sa.event.listen(store.engine, "connect", lambda *a: connections.append(a[0]))
    asyncio.run(store.save(DialogueStateTracker.from_events("patient-abc", [UserUttered("one")])))
    for number in range(3):
        tracker = asyncio.run(store.retrieve("patient-abc"))
        tracker.update(UserUttered(f"more {number}", metadata={"access_token": "SECRET"}))
        tracker.update(ActionExecuted("action_listen"))
        statements.clear()
        asyncio.run(store.save(tracker))
        assert not any("count(" in sql.lower() for sql in statements), statements
    with sqlite3.connect(database) as db:
        rows = [json.loads(data) for (data,) in db.execute("SELECT data FROM events ORDER BY id")]
    assert [r.get("text") for r in rows if r["event"] == "user"] == [
        "one",
        "more 0",
        "more 1",
        "more 2",
    ]
    assert len(rows) == len(tracker.events) == 7 and "SECRET" not in json.dumps(rows)
    assert asyncio.run(store.retrieve("patient-abc")) is tracker  # the cache agrees with the rows
    # One SQLite connection, kept open (configured once), served every query above.
    assert len(connections) <= 1


def test_a_conversation_that_began_a_new_session_is_read_again_with_that_session_only(
    tmp_path: Path,
) -> None:
    """A patient back after the session expired: the cached tracker, grown in place, would
    hold every earlier session and send them all to the action server with each action."""
    store = PatientTrackerStore(
        domain=Domain.empty(), host=f"sqlite:///{tmp_path / 'conversations.db'}", retention_days=30
    )

    def session(text: str) -> list:
        return [ActionExecuted("action_session_start"), SessionStarted(), UserUttered(text)]

    tracker = DialogueStateTracker.from_events("patient-abc", session("first visit"))
    asyncio.run(store.save(tracker))
    assert asyncio.run(store.retrieve("patient-abc")) is tracker  # one session: kept
    for event in session("second visit"):
        tracker.update(event)
    asyncio.run(store.save(tracker))
    again = asyncio.run(store.retrieve("patient-abc"))
    assert again is not tracker
    assert [e.text for e in again.events if isinstance(e, UserUttered)] == ["second visit"]
    asyncio.run(store.save(again))
    assert asyncio.run(store.retrieve("patient-abc")) is again  # one session again: kept


def test_action_responses_are_still_validated() -> None:
    """The patched validation (connectors/rasa_patches.py) accepts what Rasa's accepts and
    refuses what it refuses."""
    import connectors.patient  # noqa: F401 (applies the patch)
    import jsonschema
    from rasa.core.actions.action import RemoteAction

    action = RemoteAction("action_latest_result", None)
    good = {"events": [{"event": "slot", "name": "topic", "value": "result"}], "responses": []}
    assert action._validate_action_result(good)
    for bad in ({"events": "not a list"}, {"responses": [1]}, {"events": [{"event": 3}]}):
        with pytest.raises(jsonschema.ValidationError, match="Failed to validate"):
            action._validate_action_result(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, RemoteAction.action_response_format_spec())  # Rasa's own


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database in a throwaway PostgreSQL cluster (devtools/postgres_local.py), as
    production keeps conversations."""
    import shutil
    import socket
    import tempfile

    from devtools.postgres_local import LocalPostgres

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(tempfile.mkdtemp(prefix="scanwatch-chat-pg-"))
    try:
        cluster = LocalPostgres(root, port)
    except FileNotFoundError as exc:
        shutil.rmtree(root)
        pytest.fail(f"PostgreSQL is not installed ({exc}); scripts/bootstrap.sh installs it")
    try:
        cluster.start()
        yield cluster.database_url(driver="")
        cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_conversations_in_postgresql_hold_no_token_and_expire(postgres_url: str) -> None:
    store = PatientTrackerStore(domain=Domain.empty(), host=postgres_url, retention_days=7)
    old = time.time() - 8 * 86_400
    tracker = DialogueStateTracker.from_events(
        "patient-pg",
        [
            UserUttered("old", metadata={"access_token": "SECRET1"}, timestamp=old),
            UserUttered("new", metadata={"access_token": "SECRET2", "patient": "p"}),
        ],
    )
    asyncio.run(store.save(tracker))
    with store.session_scope() as session:
        rows = [e.data for e in session.query(store.SQLEvent).all()]
    assert len(rows) == 2 and not any("SECRET" in r for r in rows)
    assert store.purge() == 1
    again = PatientTrackerStore(domain=Domain.empty(), host=postgres_url, retention_days=7)
    restored = asyncio.run(again.retrieve("patient-pg"))
    assert [e.text for e in restored.events if isinstance(e, UserUttered)] == ["new"]
