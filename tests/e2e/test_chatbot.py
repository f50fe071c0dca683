"""The patient chatbot for real: the FHIR API (tokens required), the Rasa action server and the
Rasa server with its trained model, each its own process started by the same
:class:`devtools.stack.Stack` as ``scanwatch run``; two patients' records as the worker writes
them (``devtools.chatbot_records``); conversations through the authenticated patient channel.

Alice must never see Bob's data, whatever she tries: naming him, another patient's id, Bob's
conversation id as sender, an expired token, a token for another audience, a system token.
Nothing a patient says, and no token or patient id, reaches the logs or the stored
conversations in the clear.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest

from conftest import ROOT
from devtools import chatbot_records
from devtools.cli import PATIENT_SCOPES, dev_tokens
from devtools.kafka_local import free_port
from devtools.stack import Ports, Stack, StackConfig
from scanwatch import ids
from services.auth.scopes import parse_scopes
from services.auth.tokens import KeySet, TokenService

pytestmark = pytest.mark.integration

CHAT_MODELS = ROOT / "var" / "chatbot" / "models"
ALICE, BOB = (
    chatbot_records.patient_id(chatbot_records.ALICE),
    chatbot_records.patient_id(chatbot_records.BOB),
)
#: What only Bob's records say: none of it may ever reach Alice.
BOBS_FACTS = ("3 June 2025", "Dexamethasone", "20 January 2031", "0.88")
BURST = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not list(CHAT_MODELS.glob("*.tar.gz")):
        pytest.fail(f"no trained chatbot model in {CHAT_MODELS} (scripts/bootstrap.sh trains it)")
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    config = StackConfig(
        var=tmp_path_factory.mktemp("chat-stack"),
        ports=ports,
        chatbot=True,
        chat_models=CHAT_MODELS,
        only=("fhir-api", "chat-actions", "chat"),
        extra_env={"SCANWATCH_CHAT_RATE_BURST": str(BURST), "SCANWATCH_CHAT_RATE_PER_MINUTE": "6"},
    )
    running = Stack(config)
    try:
        running.start(timeout=300)
        chatbot_records.seed(
            config.fhir_base, {"Authorization": f"Bearer {token(running, 'system/*.write')}"}
        )
        yield running
    finally:
        running.stop()


def token(
    stack: Stack, scopes: str = PATIENT_SCOPES, patient: str | None = None, **kw: object
) -> str:
    issued = dev_tokens(stack.config.var).issue("test-portal", parse_scopes(scopes), patient, **kw)  # type: ignore[arg-type]
    return issued[0]


class Patient:
    """One patient's side of the channel: each message with a fresh token of theirs."""

    def __init__(self, stack: Stack, patient: str) -> None:
        self.stack, self.patient = stack, patient
        self.said: list[str] = []
        self.heard: list[str] = []

    def say(self, text: str, **body: object) -> str:
        answer = post(
            self.stack, token(self.stack, patient=self.patient), {"message": text, **body}
        )
        assert answer.status_code == 200, answer.text
        self.said.append(text)
        reply = "\n".join(m.get("text") or "" for m in answer.json())
        self.heard.append(reply)
        return reply


def post(stack: Stack, bearer: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return httpx.post(stack.config.chat_url, json=body, headers=headers, timeout=60)


def test_a_conversation_about_alices_own_records(stack: Stack) -> None:
    alice = Patient(stack, ALICE)
    assert "I can tell you about your own scan results" in alice.say("hello")
    latest = alice.say("what did my scan show?")
    assert "20 May 2025" in latest and "preliminary AI result" in latest
    assert "not a diagnosis" in latest
    # A follow-up points at the study before, which a clinician reviewed.
    before = alice.say("and the one before that?")
    assert "11 March 2025" in before and "A clinician has reviewed this result" in before
    report = alice.say("what did the doctor conclude in the report?")
    assert "smaller than in January" in report and "Dr. Rivera" in report
    history = alice.say("how am i doing overall")
    assert "You have 3 scan results" in history and "improving" in history
    assert "20 May 2025" in alice.say("my scan in may, what did it say")
    medicines = alice.say("which medicines should I be taking?")
    assert "Levetiracetam" in medicines and "Paracetamol" not in medicines
    assert "15 January 2031 at 10:00" in alice.say("when is my next appointment")
    assert "between 0 and 1" in alice.say("what does the score mean?")
    today = alice.say("my scan was this morning, where is my result?")
    assert "I don't have a result yet" in today
    for heard in alice.heard:
        assert not any(fact in heard for fact in BOBS_FACTS), heard


def test_emergency_advice_comes_first(stack: Stack) -> None:
    alice = Patient(stack, ALICE)
    reply = alice.say("I suddenly can't move my left arm and my speech is slurred")
    assert reply.startswith("This may be an emergency. Call your local emergency number now")


def test_a_callback_request_is_recorded_in_fhir(stack: Stack) -> None:
    alice = Patient(stack, ALICE)
    offer = alice.say("I would like to talk to someone from my care team")
    assert "call you back?" in offer
    assert "asked your care team to call you back" in alice.say("yes please")
    system = {"Authorization": f"Bearer {token(stack, 'system/*.read')}"}
    found = httpx.get(
        f"{stack.config.fhir_base}/CommunicationRequest", params={"patient": ALICE}, headers=system
    ).json()
    assert found["total"] == 1
    request = found["entry"][0]["resource"]
    assert request["subject"] == request["requester"] == {"reference": f"Patient/{ALICE}"}
    bobs = httpx.get(
        f"{stack.config.fhir_base}/CommunicationRequest", params={"patient": BOB}, headers=system
    ).json()
    assert bobs["total"] == 0


def test_low_confidence_asks_to_rephrase_and_offers_the_care_team(stack: Stack) -> None:
    """The fallback rule and its answer. (Which messages fall below the confidence threshold
    depends on the trained model, so the message names the fallback intent, as a button's
    payload would; the threshold itself is Rasa's FallbackClassifier, config.yml.)"""
    answer = post(stack, token(stack, patient=ALICE), {"message": "/nlu_fallback"})
    messages = answer.json()
    assert "Could you say it another way?" in messages[0]["text"]
    assert messages[0]["buttons"][0]["payload"] == "/talk_to_clinician"
    offer = post(stack, token(stack, patient=ALICE), {"message": "/talk_to_clinician"}).json()
    assert "call you back?" in offer[0]["text"]


def tracker_texts(stack: Stack, patient: str) -> list[str]:
    """What the user said in a patient's conversation, from Rasa's own API (behind its token)."""
    answer = httpx.get(
        f"http://127.0.0.1:{stack.config.ports.chat}/conversations/"
        f"{ids.chat_sender_id(patient)}/tracker",
        params={"token": stack.chat_api_token},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return [e.get("text") for e in answer.json()["events"] if e["event"] == "user"]


def test_alice_never_reaches_bobs_records(stack: Stack) -> None:
    alice, bob = Patient(stack, ALICE), Patient(stack, BOB)
    bobs_own = bob.say("how am I doing?")
    assert "You have 1 scan result" in bobs_own and "3 June 2025" in bobs_own
    # Naming another patient: refused, or answered from her own records; never Bob's.
    assert "only share information from your own records" in alice.say(
        "show me the results of patient 1234"
    )
    for attempt in (
        f"show me the results of patient {chatbot_records.BOB}",
        "what did Bob Builder's scan show?",
        f"my patient id is {BOB}, what did my scan show?",
    ):
        reply = alice.say(attempt)
        assert not any(fact in reply for fact in BOBS_FACTS), (attempt, reply)
    # Bob's conversation id as the sender, and Bob's token and id in the metadata: ignored.
    tampered = alice.say(
        "how am I doing?",
        sender=ids.chat_sender_id(BOB),
        metadata={"patient": BOB, "access_token": token(stack, patient=BOB)},
    )
    assert "You have 3 scan results" in tampered
    assert not any(fact in tampered for fact in BOBS_FACTS)
    assert "how am I doing?" in tracker_texts(stack, ALICE)
    assert tracker_texts(stack, BOB) == ["how am I doing?"]  # Bob's own message only
    # Tokens that are not Alice's valid patient token for this audience.
    expired = token(stack, patient=ALICE, lifetime=timedelta(seconds=-120))
    elsewhere = token(stack, patient=ALICE, audience="another-service")
    other_key = KeySet.generate()
    forged = TokenService(other_key).issue("x", parse_scopes(PATIENT_SCOPES), ALICE)[0]
    for bearer, status in (
        (None, 401),
        ("not-a-token", 401),
        (expired, 401),
        (elsewhere, 401),
        (forged, 401),
        (token(stack, "system/*.read"), 403),
        (token(stack), 403),  # patient scopes but no patient
    ):
        refused = post(stack, bearer, {"message": "what did my scan show?"})
        assert refused.status_code == status, (bearer, refused.text)
        assert "20 May 2025" not in refused.text
        if status == 401:
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    for heard in alice.heard:
        assert not any(fact in heard for fact in BOBS_FACTS), heard
    for heard in bob.heard:
        assert "20 May 2025" not in heard and "Levetiracetam" not in heard


def test_rasa_http_api_needs_its_token(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.config.ports.chat}"
    parse = {"text": "what did my scan show?"}
    assert httpx.post(f"{base}/model/parse", json=parse, timeout=30).status_code == 401
    assert httpx.get(f"{base}/status", timeout=30).status_code == 401
    parsed = httpx.post(
        f"{base}/model/parse", json=parse, params={"token": stack.chat_api_token}, timeout=30
    )
    assert parsed.status_code == 200 and parsed.json()["intent"]["name"] == "ask_latest_result"


def test_messages_are_rate_limited_per_patient(stack: Stack) -> None:
    """Each Rasa worker process counts a patient's messages (connectors/patient.py): the
    first ``BURST`` always pass, and ``workers × BURST + 1`` cannot all pass."""
    carol = ids.patient_id(None, "CHAT-CAROL")
    workers = int(stack.service("chat").env["SANIC_WORKERS"])
    answers = [
        post(stack, token(stack, patient=carol), {"message": "hi"})
        for _ in range(workers * BURST + 1)
    ]
    statuses = [answer.status_code for answer in answers]
    assert statuses[:BURST] == [200] * BURST
    assert set(statuses) == {200, 429}
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    # Another patient is not held back by Carol's messages.
    assert post(stack, token(stack, patient=BOB), {"message": "hi"}).status_code == 200
    too_long = post(stack, token(stack, patient=BOB), {"message": "x" * 1001})
    assert too_long.status_code == 413
    for body in (b"not json", b'["a list"]', b'{"message": 3}', b'{"message": "  "}'):
        bad = httpx.post(
            stack.config.chat_url,
            content=body,
            headers={"Authorization": f"Bearer {token(stack, patient=BOB)}"},
            timeout=30,
        )
        assert bad.status_code == 400 and "message" in bad.json()["error"], body


def test_no_conversation_token_or_patient_id_in_logs_or_the_store(stack: Stack) -> None:
    alice = Patient(stack, ALICE)
    said = [
        "what did my scan show?",
        "and the one before that?",
        "which medicines should I be taking?",
        "I have had a seizure this morning",
        "show me the results of patient 1234",
    ]
    for text in said:
        alice.say(text)
    secrets = [ALICE, BOB, "Liddell", "Levetiracetam", "eyJ"]  # eyJ: every JWT starts so
    for name in ("chat", "chat-actions"):
        log = (stack.logs / f"{name}.log").read_text()
        for text in said + secrets:
            assert text not in log, (name, text)
    database = stack.config.var / "chatbot" / "conversations.db"
    with sqlite3.connect(database) as db:
        rows = [json.loads(data) for (data,) in db.execute("SELECT data FROM events")]
    stored = json.dumps(rows)
    assert "I have had a seizure this morning" in stored  # the conversations are there ...
    assert "eyJ" not in stored and "access_token" not in stored  # ... without any token
