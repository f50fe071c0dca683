"""Prometheus metrics of the portal, served at ``/metrics`` (no PHI: no ids, no names).

- ``portal_sign_ins_total{outcome}``: sign-ins completed, refused, failed;
- ``portal_token_refreshes_total{outcome}``: access tokens refreshed or sessions ended;
- ``portal_sessions``: live sessions; ``portal_event_streams``: open result streams;
- ``portal_chat_messages_total{outcome}``: messages forwarded to the chatbot.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class PortalMetrics:
    """The portal's metrics, in their own registry (one per app, so tests do not collide)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.sign_ins = Counter("portal_sign_ins", "Sign-ins by outcome", ["outcome"], registry=r)
        self.refreshes = Counter(
            "portal_token_refreshes", "Access token refreshes by outcome", ["outcome"], registry=r
        )
        self.sessions = Gauge("portal_sessions", "Live sessions", registry=r)
        self.streams = Gauge("portal_event_streams", "Open result event streams", registry=r)
        self.chat = Counter(
            "portal_chat_messages", "Chat messages forwarded by outcome", ["outcome"], registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
