"""What the routes share, built once by :func:`services.portal.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from fastapi.templating import Jinja2Templates

from services.auth.web_sessions import SessionStore
from services.portal.config import Settings
from services.portal.metrics import PortalMetrics
from services.portal.sessions import Session
from services.portal.smart import SmartClient


@dataclass
class Portal:
    settings: Settings
    sessions: SessionStore[Session]
    smart: SmartClient
    http: httpx.AsyncClient  # FHIR and the chatbot, always with the patient's token
    templates: Jinja2Templates
    metrics: PortalMetrics

    def end_session(self, session: Session, remember: bool = True) -> None:
        self.sessions.end(session, remember=remember)
