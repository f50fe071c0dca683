"""Red-flag symptoms, checked in every record-answering action before any record is read: a
safety net under the ``emergency`` intent for a message the NLU model filed elsewhere ("my scan
result... I have the worst headache of my life right now")."""

from __future__ import annotations

import re

_RED_FLAGS = re.compile(
    r"\b("
    r"worst headache|thunderclap|"
    r"(having|had|is having) a (seizure|fit|stroke)|seizure|convuls\w*|"
    r"can'?t (breathe|move my|feel my|speak|see)|cannot (breathe|move my|feel my|speak|see)|"
    r"slurr\w* (speech|words)|face (is )?droop\w*|"
    r"passed out|fainted|unconscious|not waking|"
    r"chest pain|"
    r"kill myself|end my life|suicid\w*|self[- ]harm"
    r")",
    re.IGNORECASE,
)


def red_flag(text: str | None) -> bool:
    """Whether ``text`` describes a symptom that needs emergency care now."""
    return bool(text and _RED_FLAGS.search(text))
