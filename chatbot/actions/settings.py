"""The action server's settings, from the environment (``SCANWATCH_CHAT_*``). Plain dataclass:
the chatbot's virtualenv has Rasa's pydantic 1, not the pydantic-settings of the services."""

from __future__ import annotations

import os
from dataclasses import dataclass
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Settings:
    #: Base URL of the FHIR API the patient's records are read from.
    fhir_base_url: str = "http://127.0.0.1:8080/fhir"
    #: Seconds one FHIR request may take before the bot says the records are unavailable.
    fhir_timeout_s: float = 5.0
    #: How a patient reaches the care team (said by talk_to_clinician).
    care_team_contact: str = (
        "the radiology patient line, on weekdays from 8:00 to 18:00 (the number is on your "
        "appointment letter)"
    )
    #: The hospital's time zone: dates are said, and "today" is judged, in it.
    timezone: str = "UTC"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        settings = cls(
            fhir_base_url=env.get("SCANWATCH_CHAT_FHIR_BASE_URL", cls.fhir_base_url),
            fhir_timeout_s=float(env.get("SCANWATCH_CHAT_FHIR_TIMEOUT_S", cls.fhir_timeout_s)),
            care_team_contact=env.get("SCANWATCH_CHAT_CARE_TEAM_CONTACT", cls.care_team_contact),
            timezone=env.get("SCANWATCH_CHAT_TIMEZONE", cls.timezone),
        )
        _ = settings.zone  # fails now, naming the bad value, rather than at the first question
        if settings.fhir_timeout_s <= 0:
            raise ValueError(
                f"SCANWATCH_CHAT_FHIR_TIMEOUT_S must be > 0, not {settings.fhir_timeout_s}"
            )
        return settings

    @property
    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"SCANWATCH_CHAT_TIMEZONE {self.timezone!r} is not a time zone"
            ) from exc
