"""Settings of the patient portal, read from ``SCANWATCH_PORTAL_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from scanwatch.logs import LogLevel
from scanwatch.network import is_loopback
from scanwatch.service_settings import HttpsSettings

#: The front-end packages npm installs at set-up (``services/portal/package.json``).
DEFAULT_ASSETS_DIR = Path(__file__).resolve().parent / "node_modules"
#: The client id the development stack registers for the portal.
DEFAULT_CLIENT_ID = "scanwatch-portal"


class Settings(HttpsSettings):
    """Everything the portal needs; validated at start-up. Outside development (a host or
    public URL that is not loopback) it refuses plain-HTTP URLs and cookies without Secure."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_PORTAL_")

    host: str = Field("127.0.0.1", description="Interface the HTTP server listens on.")
    port: int = Field(8090, ge=0, le=65535, description="HTTP port.")
    public_url: str | None = Field(
        None,
        description="The portal's URL as patients' browsers reach it (e.g. "
        "https://portal.hospital.example); the OAuth redirect URI is <public_url>/callback and "
        "must be the one registered for the client. Unset: http://<host>:<port> (development).",
    )
    fhir_base_url: str = Field(
        "http://127.0.0.1:8080/fhir",
        description="FHIR base URL. Its /.well-known/smart-configuration names the "
        "authorization server's endpoints and JWKS; every read goes here with the patient's "
        "own token (the portal holds no token of its own).",
    )
    client_id: str = Field(DEFAULT_CLIENT_ID, description="The portal's registered client id.")
    client_secret: SecretStr = Field(
        SecretStr(""),
        description="The portal's client secret (a confidential client: it authenticates to "
        "the token and revocation endpoints with it). Required: no default, refused empty.",
        repr=False,
    )
    chat_url: str = Field(
        "http://127.0.0.1:5005/webhooks/patient/webhook",
        description="The chatbot's patient channel; the portal forwards the patient's messages "
        "there with the patient's token.",
    )
    cookie_name: str = Field(
        "scanwatch_portal_session",
        pattern=r"^[A-Za-z0-9_]{1,64}$",
        description="Name of the session cookie (a random id; the session itself, tokens "
        "included, stays on the server). With Secure cookies the name gets the __Host- prefix.",
    )
    cookie_secure: bool | None = Field(
        None,
        description="Mark the session cookie Secure (HTTPS only). Unset: Secure unless the "
        "portal is on loopback over http (development). False is refused off loopback.",
    )
    session_idle_s: int = Field(
        1800, ge=60, le=86400, description="A session unused this long ends (sign in again)."
    )
    session_max_s: int = Field(
        43200, ge=300, le=7 * 86400, description="Longest a session lasts, used or not."
    )
    login_timeout_s: int = Field(
        600, ge=30, le=3600, description="How long a started sign-in may take to come back."
    )
    poll_interval_s: float = Field(
        1.0,
        gt=0.05,
        le=60,
        description="How often an open page's event stream asks FHIR for new results (with "
        "the patient's token, _lastUpdated=gt<last seen>): new results show within this plus "
        "one request.",
    )
    http_timeout_s: float = Field(
        15.0, gt=0, le=120, description="Timeout of one call to FHIR, the auth server or chat."
    )
    jwks_ttl_s: float = Field(
        300.0, gt=0, le=86400, description="Seconds the auth server's public keys are cached."
    )
    timezone: str = Field(
        "UTC", description="Time zone the pages give dates and times in (IANA name)."
    )
    assets_dir: Path = Field(
        DEFAULT_ASSETS_DIR,
        description="Where npm installed the front-end packages (chart.js) that the portal "
        "serves itself at /static/vendor/ (never a CDN).",
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")

    @field_validator("fhir_base_url", "chat_url", "public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone {value!r} is not an IANA time zone") from exc
        return value

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        if self.session_idle_s > self.session_max_s:
            raise ValueError("session_idle_s must not exceed session_max_s")
        if not self.client_secret.get_secret_value():
            raise ValueError(
                "client_secret must not be empty: set SCANWATCH_PORTAL_CLIENT_SECRET (the "
                "portal's secret at the authorization server; it has no default)"
            )
        public = urlsplit(self.base_url)
        local = is_loopback(self.host) and is_loopback(public.hostname or "")
        if not local:
            if public.scheme != "https":
                raise ValueError(
                    f"the portal is not on loopback ({self.base_url}): set "
                    "SCANWATCH_PORTAL_PUBLIC_URL to its https:// URL"
                )
            if self.cookie_secure is False:
                raise ValueError(
                    "SCANWATCH_PORTAL_COOKIE_SECURE=false is refused off loopback: the session "
                    "cookie must only travel over HTTPS"
                )
        return self

    @property
    def base_url(self) -> str:
        """The portal's own URL (``public_url``, or http://host:port in development)."""
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def redirect_uri(self) -> str:
        """Where the authorization server sends the patient back (registered for the client)."""
        return f"{self.base_url}/callback"

    @property
    def secure_cookies(self) -> bool:
        if self.cookie_secure is not None:
            return self.cookie_secure
        return urlsplit(self.base_url).scheme == "https"

    @property
    def session_cookie(self) -> str:
        """The cookie's name: ``__Host-`` prefixed when Secure (bound to this host, path /)."""
        return f"__Host-{self.cookie_name}" if self.secure_cookies else self.cookie_name

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def smart_configuration_url(self) -> str:
        return f"{self.fhir_base_url}/.well-known/smart-configuration"
