"""The chatbot's unit tests read two patients' records from chatbot/tests/fhir_records.json
(its virtualenv has no FHIR library): the file must be what the worker's builders write today."""

from __future__ import annotations

from devtools import chatbot_records


def test_the_chatbot_fixture_is_what_the_builders_write() -> None:
    assert chatbot_records.FIXTURE.read_text() == chatbot_records.fixture_text(), (
        "regenerate it: .venv/bin/python -m devtools.chatbot_records"
    )


def test_the_two_patients_records_never_mix() -> None:
    alice, bob = (
        chatbot_records.patient_id(p) for p in (chatbot_records.ALICE, chatbot_records.BOB)
    )
    for patient, resources in (
        (alice, chatbot_records.records()[chatbot_records.ALICE]),
        (bob, chatbot_records.records()[chatbot_records.BOB]),
    ):
        for resource in resources:
            text = str(resource)
            other = bob if patient == alice else alice
            assert other not in text, resource["resourceType"]
