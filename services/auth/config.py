"""Settings of the authorization server (SMART sign-in, patient accounts), read from
``SCANWATCH_AUTH_*`` environment variables. The FHIR API's app factory, which serves these
routes, reads them beside its own settings (``services.fhir_api.config``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scanwatch.network import is_loopback


class AuthSettings(BaseSettings):
    """Everything the authorization server's sign-in and accounts need; validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_AUTH_")

    issuer: str | None = Field(
        None,
        description="Public base URL of the authorization server (e.g. https://host): the "
        "OpenID issuer of id_tokens, the root of the endpoints in the SMART configuration and "
        "of the activation links. Unset: derived from each request (development).",
    )
    code_lifetime_s: int = Field(
        60, ge=10, le=600, description="Lifetime of an authorization code (single use)."
    )
    refresh_lifetime_s: int = Field(
        14 * 86400,
        ge=300,
        le=90 * 86400,
        description="Lifetime of a refresh token (offline_access); each use replaces it with a "
        "new one of the same lifetime.",
    )
    invite_lifetime_s: int = Field(
        72 * 3600,
        ge=300,
        le=30 * 86400,
        description="How long a patient's activation link works (once).",
    )
    max_failed_signins: int = Field(
        5, ge=1, le=100, description="Failed sign-ins in a row that lock an account."
    )
    lockout_s: int = Field(
        900, ge=10, le=86400, description="How long a locked account refuses every sign-in."
    )
    portal_url: str | None = Field(
        None,
        description="Where the patient portal is (linked from the page shown after activation).",
    )
    console_url: str | None = Field(
        None,
        description="Where the staff console is (linked from the page shown after a staff "
        "account's activation).",
    )

    @field_validator("issuer", "portal_url", "console_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL, not {value!r}")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(f"must be https off loopback (passwords and tokens), not {value!r}")
        return value.rstrip("/")
