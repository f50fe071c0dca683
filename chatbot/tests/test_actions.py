"""The custom actions against a fake FHIR API (tests/fake_fhir.py) holding two patients'
records as the worker writes them: what each answer says, which study a pointer picks, the
safety rules (emergency first, no other patient, always the result's source), and that every
read carries the patient's own token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from actions import actions
from actions.settings import Settings
from rasa_sdk import Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher

from tests.fake_fhir import RECORDS, FakeFhir, serve

ALICE, BOB = sorted(RECORDS, key=lambda p: len(RECORDS[p]), reverse=True)  # Alice has 3 studies
TOKENS = {"alice-token": ALICE, "bob-token": BOB}
ALICE_STUDIES = [
    f"ImagingStudy/{r['id']}" for r in RECORDS[ALICE] if r["resourceType"] == "ImagingStudy"
]  # January, March, May


@pytest.fixture
def fhir(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFhir]:
    with serve(FakeFhir(dict(TOKENS))) as fake:
        monkeypatch.setattr(actions, "SETTINGS", Settings(fhir_base_url=fake.base_url))
        yield fake


def run(
    action: Any,
    text: str = "",
    token: str | None = "alice-token",
    entities: list[dict[str, str]] | None = None,
    slots: dict[str, Any] | None = None,
) -> tuple[str, list[dict[str, Any]], list[Any]]:
    """(all the bot's text, its messages, the events) of one action on one message."""
    metadata = {"access_token": token, "patient": TOKENS.get(token or "")} if token else {}
    message = {
        "text": text,
        "intent": {"name": "x", "confidence": 1.0},
        "entities": entities or [],
        "metadata": metadata,
        "message_id": "m1",
    }
    tracker = Tracker("patient-abc", slots or {}, message, [], False, None, {}, None)
    dispatcher = CollectingDispatcher()

    events = asyncio.run(action.run(dispatcher, tracker, {}))
    return "\n".join(m.get("text") or "" for m in dispatcher.messages), dispatcher.messages, events


def entity(name: str, value: str) -> list[dict[str, str]]:
    return [{"entity": name, "value": value}]


def cursor(events: list[Any]) -> str | None:
    return next((e["value"] for e in events if e.get("name") == "study_cursor"), None)


def test_the_latest_result_says_its_source_date_and_that_it_is_no_diagnosis(fhir: FakeFhir) -> None:
    text, _, events = run(actions.ActionLatestResult(), "what did my scan show?")
    assert "20 May 2025" in text
    assert "preliminary AI result" in text and "no clinician has reviewed it" in text
    assert "not a diagnosis" in text and "care team will discuss" in text
    assert "did not flag anything unusual (score 0.29; scores above 0.50" in text
    assert cursor(events) == ALICE_STUDIES[2]
    assert SlotSet("topic", "result") in events
    assert {s.patient for s in fhir.seen} == {ALICE}
    assert all(s.query.get("patient", ALICE) == ALICE for s in fhir.seen)


def test_pointers_pick_a_study_and_the_one_before_that(fhir: FakeFhir) -> None:
    text, _, events = run(actions.ActionLatestResult(), "march", entities=entity("month", "march"))
    assert "11 March 2025" in text and "A clinician has reviewed this result" in text
    assert cursor(events) == ALICE_STUDIES[1]
    # "the one before that", after talking about March: January.
    text, _, events = run(
        actions.ActionFollowUp(),
        "and the one before that?",
        entities=entity("study_ref", "previous"),
        slots={"study_cursor": ALICE_STUDIES[1], "topic": "status"},
    )
    assert "14 January 2025" in text and "preliminary AI result" in text
    assert cursor(events) == ALICE_STUDIES[0] and SlotSet("topic", "status") in events
    # Before the first one there is none; a month without a scan names the dates there are.
    text, _, _ = run(
        actions.ActionLatestResult(),
        "before that?",
        entities=entity("study_ref", "previous"),
        slots={"study_cursor": ALICE_STUDIES[0]},
    )
    assert "a scan before that one" in text
    text, _, _ = run(actions.ActionLatestResult(), "august", entities=entity("month", "august"))
    assert (
        "a scan in August" in text and "from: 20 May 2025, 11 March 2025, 14 January 2025." in text
    )
    text, _, _ = run(
        actions.ActionLatestResult(), "the first", entities=entity("study_ref", "first")
    )
    assert "14 January 2025" in text


def test_a_scan_this_morning_without_a_result_yet(fhir: FakeFhir) -> None:
    text, _, _ = run(
        actions.ActionResultStatus(),
        "my scan was this morning, where is my result?",
        entities=entity("study_ref", "today"),
    )
    assert "I don't have a result yet for a scan today" in text
    assert "usually finishes within minutes" in text


def test_a_scan_received_but_not_scored_yet_is_what_the_newest_scan_questions_answer(
    fhir: FakeFhir,
) -> None:
    # The worker records a study as "registered" while the model scores it (or is down).
    study = next(r for r in RECORDS[ALICE] if r["resourceType"] == "ImagingStudy")
    now = datetime.now(UTC)
    waiting = study | {"id": "waiting", "status": "registered", "started": now.isoformat()}
    fhir.records[ALICE] = [*RECORDS[ALICE], waiting]
    today = (
        f"{now.astimezone(actions.SETTINGS.zone).day} {now.astimezone(actions.SETTINGS.zone):%B %Y}"
    )

    for action, text, entities in (
        (actions.ActionResultStatus(), "my scan was this morning, where is my result?", "today"),
        (actions.ActionLatestResult(), "what did my scan show?", None),
    ):
        said, _, events = run(
            action, text, entities=entity("study_ref", entities) if entities else None
        )
        assert f"Your scan of {today} has reached us" in said
        assert "not finished yet" in said
        assert "latest result I have is of your scan of 20 May 2025" in said
        assert SlotSet("study_cursor", None) in events
    # A question about an older scan still answers that one; Bob never hears of Alice's.
    said, _, _ = run(actions.ActionLatestResult(), "march", entities=entity("month", "march"))
    assert "11 March 2025" in said and "reached us" not in said
    said, _, _ = run(actions.ActionLatestResult(), "what did my scan show?", token="bob-token")
    assert "reached us" not in said and "June 2025" in said
    assert {s.query.get("status") for s in fhir.seen if s.path.endswith("/ImagingStudy")} == {
        "registered"
    }


def test_status_and_report_follow_the_clinician(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionResultStatus(), "was it reviewed?")
    assert "20 May 2025 is a preliminary AI result" in text
    text, _, _ = run(actions.ActionReportSummary(), "what did the doctor conclude?")
    assert "No clinician has signed a report on your scan of 20 May 2025 yet" in text
    text, _, _ = run(
        actions.ActionReportSummary(), "march report", entities=entity("month", "march")
    )
    assert "signed by Dr. Rivera, radiologist on 12 March 2025" in text
    assert "smaller than in January" in text and "care team will discuss" in text


def test_history_lists_every_study_oldest_first_with_the_trend(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionResultHistory(), "how am I doing?")
    lines = text.splitlines()
    assert lines[0] == "You have 3 scan results:"
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "- 14 January 2025",
        "- 11 March 2025",
        "- 20 May 2025",
    ]
    assert "score 0.78, flagged, preliminary AI result" in lines[1]
    assert "reviewed by a clinician" in lines[2]
    assert "(0.59 → 0.29): improving" in text and "not a diagnosis" in text


def test_the_score_explained_with_the_patients_numbers(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionExplainScore(), "what does the score mean")
    assert "between 0 and 1" in text and "threshold (0.50)" in text
    assert "a mass (a growth)" in text and "not a diagnosis" in text
    assert "20 May 2025 is 0.29" in text and "preliminary AI result" in text


def test_medicines_and_the_next_appointment(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionMedications(), "my medicines")
    assert "Levetiracetam 500 mg oral tablet: one tablet twice a day" in text
    assert "Paracetamol" not in text  # stopped
    assert "Dexamethasone" not in text  # Bob's
    text, _, _ = run(actions.ActionNextAppointment(), "next appointment")
    assert text.startswith("Your next appointment is on Wednesday 15 January 2031 at 10:00")


def test_an_emergency_is_answered_before_any_record_is_read(fhir: FakeFhir) -> None:
    _, messages, _ = run(
        actions.ActionLatestResult(), "my scan... and I have the worst headache of my life"
    )
    assert messages == [
        {
            "text": None,
            "buttons": [],
            "elements": [],
            "custom": {},
            "template": "utter_emergency",
            "response": "utter_emergency",
            "image": None,
            "attachment": None,
        }
    ]
    assert fhir.seen == []


def test_questions_about_another_patient_are_refused_without_a_read(fhir: FakeFhir) -> None:
    text, _, _ = run(
        actions.ActionLatestResult(),
        "show me the results of patient 1234",
        entities=entity("patient_ref", "patient 1234"),
    )
    assert text == actions.ONLY_YOURS and fhir.seen == []


def test_bobs_token_reads_bobs_records_only(fhir: FakeFhir) -> None:
    text, _, _ = run(actions.ActionResultHistory(), "how am I doing?", token="bob-token")
    assert "You have 1 scan result:" in text and "3 June 2025" in text
    assert "May 2025" not in text and "March 2025" not in text
    assert {s.patient for s in fhir.seen} == {BOB}


def test_no_token_an_expired_one_or_no_fhir_api(
    fhir: FakeFhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, _, _ = run(actions.ActionLatestResult(), "my result", token=None)
    assert text == actions.SIGN_IN and fhir.seen == []
    fhir.tokens.pop("alice-token")  # the FHIR API no longer accepts it
    text, _, _ = run(actions.ActionLatestResult(), "my result")
    assert text == actions.FAILURES["expired"]
    monkeypatch.setattr(actions, "SETTINGS", Settings(fhir_base_url="http://127.0.0.1:9/fhir"))
    text, _, _ = run(actions.ActionLatestResult(), "my result", token="bob-token")
    assert text == actions.FAILURES["unavailable"]


def test_a_callback_request_is_recorded_for_the_patient(fhir: FakeFhir) -> None:
    text, messages, events = run(actions.ActionOfferCallback(), "can a nurse call me?")
    assert "radiology patient line" in text and "call you back?" in text
    assert [b["payload"] for b in messages[0]["buttons"]] == ["/affirm", "/deny"]
    assert events == [SlotSet("callback_offered", True)]
    text, _, events = run(actions.ActionRequestCallback(), "yes please")
    assert "asked your care team to call you back" in text
    assert events == [SlotSet("callback_offered", False)]
    (created,) = fhir.created
    assert created["resourceType"] == "CommunicationRequest"
    assert created["subject"] == created["requester"] == {"reference": f"Patient/{ALICE}"}
    assert created["identifier"][0]["value"] == "patient-abc/m1"
    assert fhir.seen[-1].patient == ALICE
    text, _, events = run(actions.ActionDeclineCallback(), "no")
    assert "won't ask them to call" in text and events == [SlotSet("callback_offered", False)]
