"""Settings of the authorization server (services/auth/config.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.auth.config import AuthSettings


def test_the_issuer_is_https_off_loopback() -> None:
    assert AuthSettings(issuer="http://127.0.0.1:8080/").issuer == "http://127.0.0.1:8080"
    assert AuthSettings(issuer="https://auth.example").issuer == "https://auth.example"
    with pytest.raises(ValidationError, match="https off loopback"):
        AuthSettings(issuer="http://auth.example")
    with pytest.raises(ValidationError, match="http"):
        AuthSettings(portal_url="ftp://portal.example")
