"""The portal's settings refuse what is unsafe outside development, and its entry point says
why instead of starting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.portal.__main__ import main
from services.portal.config import Settings


def test_development_defaults_on_loopback() -> None:
    settings = Settings(client_secret="s")
    assert settings.redirect_uri == "http://127.0.0.1:8090/callback"
    assert not settings.secure_cookies and settings.session_cookie == "scanwatch_portal_session"
    assert "client_secret" not in repr(settings) and "'s'" not in repr(settings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"host": "0.0.0.0"}, "https:// URL"),
        ({"public_url": "http://portal.example"}, "https:// URL"),
        (
            {"host": "0.0.0.0", "public_url": "https://portal.example", "cookie_secure": False},
            "COOKIE_SECURE=false is refused",
        ),
        ({"client_secret": ""}, "client_secret must not be empty"),
        ({"timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"fhir_base_url": "ftp://x"}, "http(s) URL"),
        ({"session_idle_s": 7200, "session_max_s": 3600}, "session_idle_s"),
    ],
)
def test_unsafe_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**({"client_secret": "s"} | values))


def test_production_settings() -> None:
    settings = Settings(client_secret="s", host="0.0.0.0", public_url="https://portal.example/")
    assert settings.redirect_uri == "https://portal.example/callback"
    assert settings.secure_cookies
    assert settings.session_cookie == "__Host-scanwatch_portal_session"


def test_main_refuses_without_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCANWATCH_PORTAL_CLIENT_SECRET", raising=False)
    assert main([]) == 2
