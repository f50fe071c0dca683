"""The console's settings refuse what is unsafe outside development, and its entry point says
why instead of starting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.console.__main__ import main
from services.console.config import Settings


def test_development_defaults_on_loopback() -> None:
    settings = Settings()
    assert Settings(host="0.0.0.0").jwks_url.startswith("http://127.0.0.1")  # a loopback fetch
    assert settings.storage_dir == Path("var/store") and settings.index_max_age_s == 0
    assert settings.jwks_url == "http://127.0.0.1:8080/auth/jwks"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"host": "0.0.0.0", "jwks_url": "http://auth.example/jwks"}, "must be https"),
        (
            {
                "host": "0.0.0.0",
                "jwks_url": "https://auth.example/jwks",
                "public_url": "http://console.example",
            },
            "PUBLIC_URL must be https",
        ),  # fmt: skip
        ({"jwks_url": "ftp://x"}, "http(s) URL"),
        ({"index_max_age_s": -1}, "greater than or equal"),
    ],
)
def test_unsafe_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**values)


def test_production_settings() -> None:
    settings = Settings(
        host="0.0.0.0",
        jwks_url="https://auth.hospital.example/auth/jwks",
        public_url="https://console.hospital.example/",
    )
    assert settings.public_url == "https://console.hospital.example"


def test_main_refuses_unsafe_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCANWATCH_CONSOLE_JWKS_URL", "http://auth.example/auth/jwks")
    assert main(["--host", "0.0.0.0"]) == 2
    assert "invalid settings" in capsys.readouterr().err
