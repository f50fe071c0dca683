"""The chatbot's custom actions: answers from the patient's own FHIR records.

Every action that touches records first checks the message for red-flag symptoms (the
emergency advice comes before anything else), refuses questions about another patient, and
reads with the access token the input channel verified and put in the message's metadata. The
patient is the token's; a patient named in the text is never looked up.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Any

import aiohttp
from rasa_sdk import Action, Tracker
from rasa_sdk.events import EventType, SlotSet
from rasa_sdk.executor import CollectingDispatcher

from actions import records
from actions.fhir import PatientRecords, RecordsError
from actions.safety import red_flag
from actions.settings import Settings
from scanwatch.care_plan import callback_request
from scanwatch.ids import CALLBACK_REQUEST_ID_SYSTEM

SETTINGS = Settings.from_env()

ONLY_YOURS = (
    "I can only share information from your own records, so I can't tell you about anyone "
    "else's results. Ask me about your own scans, medicines or appointments."
)
SIGN_IN = "I can't tell who you are, so I can't open your records. Please sign in again."
FAILURES = {
    "expired": "Your session has expired. Please sign in again, then ask me once more.",
    "refused": "I am not allowed to open that record for you.",
    "unavailable": (
        "I can't reach your records right now. Please try again in a few minutes. If it is "
        "urgent, contact your care team."
    ),
}


def entity_values(message: dict[str, Any], name: str) -> list[str]:
    return [str(e["value"]) for e in message.get("entities", []) if e.get("entity") == name]


def pointer_of(message: dict[str, Any]) -> records.Pointer:
    """The study the latest message points at (its own entities, not remembered slots)."""
    months = [m.lower() for m in entity_values(message, "month")]
    refs = entity_values(message, "study_ref")
    return records.Pointer(
        month=next((m for m in months if m in records.MONTHS), None),
        ref=next(
            (r for r in refs if r in ("latest", "previous", "first", "today", "yesterday")), None
        ),
    )


class RecordsAction(Action):
    """An action that answers from the patient's records. Subclasses implement :meth:`answer`;
    ``topic`` is remembered so that a follow-up ("and in March?") asks the same question."""

    action_name = ""
    topic: str | None = None

    def name(self) -> str:
        return self.action_name

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]
    ) -> list[EventType]:
        message = tracker.latest_message or {}
        if red_flag(message.get("text")):
            dispatcher.utter_message(response="utter_emergency")
            return []
        if entity_values(message, "patient_ref"):
            dispatcher.utter_message(text=ONLY_YOURS)
            return []
        metadata = message.get("metadata") or {}
        token, patient = metadata.get("access_token"), metadata.get("patient")
        if not token or not patient:
            dispatcher.utter_message(text=SIGN_IN)
            return []
        # One connection pool per answer: its few reads share it, and nothing outlives it.
        async with aiohttp.ClientSession() as session:
            patient_records = PatientRecords(
                session, SETTINGS.fhir_base_url, token, patient, SETTINGS.fhir_timeout_s
            )
            try:
                events = await self.answer(
                    patient_records, dispatcher, tracker, pointer_of(message)
                )
            except RecordsError as exc:
                dispatcher.utter_message(text=FAILURES[exc.reason])
                return []
        return [*events, SlotSet("topic", self.topic)] if self.topic else events

    async def answer(
        self,
        patient_records: PatientRecords,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        pointer: records.Pointer,
    ) -> list[EventType]:
        raise NotImplementedError


def _today() -> datetime:
    return datetime.now(UTC).astimezone(SETTINGS.zone)


async def _chosen(
    patient_records: PatientRecords, tracker: Tracker, pointer: records.Pointer
) -> tuple[list[records.Result], records.Choice]:
    results = records.results_by_study(await patient_records.results())
    cursor = tracker.get_slot("study_cursor")
    return results, records.choose(results, pointer, cursor, _today().date(), SETTINGS.zone)


def _means_newest(tracker: Tracker, pointer: records.Pointer) -> bool:
    """Whether the patient means their newest scan (which may have no result yet)."""
    if pointer.ref in ("latest", "today", "yesterday"):
        return True
    return pointer.empty and tracker.get_slot("study_cursor") is None


def _still_waiting(
    received: list[records.Received], choice: records.Choice, pointer: records.Pointer
) -> records.Received | None:
    """The newest study received but not scored that the patient's question is about: on the
    day they name, and newer than the result chosen."""
    today = _today().date()
    for study in received:
        local = study.when.astimezone(SETTINGS.zone).date() if study.when else None
        if pointer.ref == "today" and local != today:
            continue
        if pointer.ref == "yesterday" and local != date.fromordinal(today.toordinal() - 1):
            continue
        chosen = choice.result.when if choice.result else None
        if chosen is None or (study.when is not None and study.when >= chosen):
            return study
    return None


async def _signed_report(
    patient_records: PatientRecords, result: records.Result
) -> records.Report | None:
    """The clinician's signed report on ``result``'s study, if there is one."""
    return records.final_reports(await patient_records.reports()).get(result.study)


def _missing(results: list[records.Result], choice: records.Choice) -> str:
    if not results:
        return "I don't find any scan results in your records yet. " + records.NOT_YET.format(
            what="your scan"
        )
    dates = ", ".join(records.day(r.when, SETTINGS.zone) for r in results)
    return f"I don't find {choice.missing}. Your scans with a result are from: {dates}."


class StudyAction(RecordsAction):
    """A question about one study: the one the message points at (or the conversation's), its
    signed report if any; :meth:`found` says the answer, :meth:`not_found` why there is none.
    With ``tells_received``, a newest scan that arrived but has no result yet is the answer."""

    tells_received = False

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        if self.tells_received and _means_newest(tracker, pointer):
            (results, choice), imaging = await asyncio.gather(
                _chosen(patient_records, tracker, pointer), patient_records.received()
            )
            waiting = _still_waiting(records.received_studies(imaging), choice, pointer)
            if waiting is not None:
                latest = results[0] if results else None
                dispatcher.utter_message(
                    text=records.describe_received(waiting, SETTINGS.zone, latest)
                )
                return [SlotSet("study_cursor", None)]
        else:
            results, choice = await _chosen(patient_records, tracker, pointer)
        if choice.result is None:
            dispatcher.utter_message(text=self.not_found(results, choice, pointer))
            return []
        report = await _signed_report(patient_records, choice.result)
        dispatcher.utter_message(text=self.found(choice.result, report))
        return [SlotSet("study_cursor", choice.result.study)]

    def not_found(
        self, results: list[records.Result], choice: records.Choice, pointer: records.Pointer
    ) -> str:
        return _missing(results, choice)

    def found(self, result: records.Result, report: records.Report | None) -> str:
        raise NotImplementedError


class ActionLatestResult(StudyAction):
    action_name = "action_latest_result"
    topic = "result"
    tells_received = True

    def not_found(self, results, choice, pointer):  # type: ignore[no-untyped-def]
        if pointer.ref in ("today", "yesterday"):
            return records.NOT_YET.format(what=choice.missing)
        return _missing(results, choice)

    def found(self, result, report):  # type: ignore[no-untyped-def]
        return records.describe(result, SETTINGS.zone, report)


class ActionResultStatus(StudyAction):
    action_name = "action_result_status"
    topic = "status"
    tells_received = True

    def not_found(self, results, choice, pointer):  # type: ignore[no-untyped-def]
        return records.NOT_YET.format(what=choice.missing if results else "your scan")

    def found(self, result, report):  # type: ignore[no-untyped-def]
        return records.describe_status(result, SETTINGS.zone, report)


class ActionReportSummary(StudyAction):
    action_name = "action_report_summary"
    topic = "report"

    def found(self, result, report):  # type: ignore[no-untyped-def]
        if report is not None:
            return records.describe_report(report, result, SETTINGS.zone)
        return (
            f"No clinician has signed a report on your scan of "
            f"{records.day(result.when, SETTINGS.zone)} yet. "
            f"{records.status_words(result, SETTINGS.zone)} Once a clinician "
            "has written their conclusion, I can tell you what it says."
        )


class ActionExplainScore(RecordsAction):
    action_name = "action_explain_score"
    topic = "explain"

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        _, choice = await _chosen(patient_records, tracker, pointer)
        dispatcher.utter_message(text=records.describe_score(choice.result, SETTINGS.zone))
        return [SlotSet("study_cursor", choice.result.study)] if choice.result else []


class ActionResultHistory(RecordsAction):
    action_name = "action_result_history"

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        results = records.results_by_study(await patient_records.results())
        if not results:
            dispatcher.utter_message(text="I don't find any scan results in your records yet.")
            return []
        dispatcher.utter_message(text=records.describe_history(results, SETTINGS.zone))
        return [SlotSet("study_cursor", results[0].study)]


class ActionMedications(RecordsAction):
    action_name = "action_medications"

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        lines = records.medication_lines(await patient_records.medications())
        if not lines:
            text = (
                "I don't see any current prescriptions in your records. If you think that is "
                "wrong, please ask your care team."
            )
        else:
            text = "\n".join(
                [
                    "Your current medicines, as prescribed:",
                    *lines,
                    "Please take them as your prescriber told you, and ask your care team "
                    "before you change or stop anything.",
                ]
            )
        dispatcher.utter_message(text=text)
        return []


class ActionNextAppointment(RecordsAction):
    action_name = "action_next_appointment"

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        appointment = await patient_records.next_appointment(_today())
        dispatcher.utter_message(text=records.describe_appointment(appointment, SETTINGS.zone))
        return []


#: The actions a follow-up ("and the one in March?") repeats, by the topic they leave behind.
_BY_TOPIC: dict[str, RecordsAction] = {
    a.topic: a
    for a in (
        ActionLatestResult(),
        ActionResultStatus(),
        ActionReportSummary(),
        ActionExplainScore(),
    )
    if a.topic
}


class ActionFollowUp(RecordsAction):
    """A bare pointer or a correction: the last question again, for the study it names."""

    action_name = "action_follow_up"

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        action = _BY_TOPIC.get(tracker.get_slot("topic") or "result", _BY_TOPIC["result"])
        events = await action.answer(patient_records, dispatcher, tracker, pointer)
        return [*events, SlotSet("topic", action.topic)]


class ActionOfferCallback(Action):
    """How to reach the care team, and the offer of a call back (recorded only on yes)."""

    def name(self) -> str:
        return "action_offer_callback"

    async def run(self, dispatcher, tracker, domain):  # type: ignore[no-untyped-def]
        if red_flag((tracker.latest_message or {}).get("text")):
            dispatcher.utter_message(response="utter_emergency")
        dispatcher.utter_message(
            text=(
                f"You can reach your care team through {SETTINGS.care_team_contact}. Would you "
                "like me to ask them to call you back?"
            ),
            buttons=[
                {"title": "Yes, please call me", "payload": "/affirm"},
                {"title": "No, thanks", "payload": "/deny"},
            ],
        )
        return [SlotSet("callback_offered", True)]


class ActionRequestCallback(RecordsAction):
    """Records the call-back request as a FHIR CommunicationRequest the console lists."""

    action_name = "action_request_callback"

    async def answer(self, patient_records, dispatcher, tracker, pointer):  # type: ignore[no-untyped-def]
        # One request per message: a retried action finds the first by its key.
        key = f"{tracker.sender_id}/{(tracker.latest_message or {}).get('message_id')}"
        await patient_records.create(
            callback_request(patient_records.patient, authored_on=datetime.now(UTC), key=key),
            if_none_exist=f"identifier={CALLBACK_REQUEST_ID_SYSTEM}|{key}",
        )
        dispatcher.utter_message(
            text=(
                "Done: I have asked your care team to call you back. They usually call within "
                "one working day. If your symptoms get worse, call your local emergency number."
            )
        )
        return [SlotSet("callback_offered", False)]

    async def run(self, dispatcher, tracker, domain):  # type: ignore[no-untyped-def]
        events = await super().run(dispatcher, tracker, domain)
        # Whatever happened, the offer has been answered.
        return events if events else [SlotSet("callback_offered", False)]


class ActionDeclineCallback(Action):
    def name(self) -> str:
        return "action_decline_callback"

    async def run(self, dispatcher, tracker, domain):  # type: ignore[no-untyped-def]
        dispatcher.utter_message(
            text="All right, I won't ask them to call. Is there anything else I can help with?"
        )
        return [SlotSet("callback_offered", False)]
