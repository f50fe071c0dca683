"""The portal's sessions: :class:`services.auth.web_sessions.WebSession` (server-side, the
browser holds only its id) plus the signed-in patient and the chat transcript."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.auth.web_sessions import WebSession

#: Most chat lines a session keeps (the transcript the chat page shows without JavaScript).
MAX_CHAT_LINES = 60


@dataclass
class ChatLine:
    """One line of the chat transcript: who said it, the text, the buttons the bot offered."""

    speaker: str  # "you" or "bot"
    text: str
    buttons: list[tuple[str, str]] = field(default_factory=list)  # (title, payload)


@dataclass
class Session(WebSession):
    """One browser's session with the portal."""

    patient: str | None = None
    chat: list[ChatLine] = field(default_factory=list)

    @property
    def signed_in(self) -> bool:
        return self.patient is not None and self.access_token is not None

    def add_chat(self, line: ChatLine) -> None:
        self.chat.append(line)
        del self.chat[:-MAX_CHAT_LINES]
