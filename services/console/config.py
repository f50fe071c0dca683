"""Settings of the console, read from ``SCANWATCH_CONSOLE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from scanwatch.logs import LogLevel
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from scanwatch.network import is_loopback
from scanwatch.service_settings import HttpsSettings
from services.auth.tokens import TOKEN_AUDIENCE, TOKEN_ISSUER

#: The listener's default file store (``SCANWATCH_LISTENER_STORAGE_DIR``).
DEFAULT_STORAGE_DIR = Path("var/store")
#: Where the instance index lives in development (a cache: deleting it only costs a rescan).
DEFAULT_INDEX_URL = "sqlite:///var/console/dicom-index.db"


class Settings(HttpsSettings):
    """Everything the console needs; validated at start-up. Outside development (a host that
    is not loopback) it refuses a JWKS fetched over plain HTTP from another machine and an
    http public URL."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_CONSOLE_")

    host: str = Field("127.0.0.1", description="Interface the HTTP server listens on.")
    port: int = Field(8100, ge=0, le=65535, description="HTTP port.")
    public_url: str | None = Field(
        None,
        description="The console's URL as viewers reach it (e.g. https://console.hospital."
        "example); QIDO-RS answers' RetrieveURL values start with it. Unset: the URL each "
        "request came in on (development).",
    )
    storage_dir: Path = Field(
        DEFAULT_STORAGE_DIR,
        description="The listener's file store (SCANWATCH_LISTENER_STORAGE_DIR), read only: "
        "<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>[.v<N>].dcm.",
    )
    index_url: str = Field(
        DEFAULT_INDEX_URL,
        description="SQLAlchemy URL of the instance index (SQLite file or PostgreSQL). It is "
        "a cache of the store's headers: removing it costs one rescan, nothing is lost.",
    )
    index_max_age_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="A search may answer from an index topped up at most this long before "
        "it arrived. 0 (default): every search and retrieval tops the index up first (a "
        "directory stat per series, a header read per new file), so every instance the "
        "listener stored before the request is in the answer.",
    )
    scan_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="The index is also topped up in the background this often, so that a "
        "search after a burst of stores reads few new headers.",
    )
    max_results: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Most matches one QIDO-RS answer holds (limit is capped to it); a "
        "Warning header says when more matched.",
    )
    jwks_url: str = Field(
        "http://127.0.0.1:8080/auth/jwks",
        description="The authorization server's published keys: bearer tokens are verified "
        "against them (cached, refetched for an unknown kid).",
    )
    jwks_file: Path | None = Field(
        None,
        description="A JWK Set file to verify tokens with instead of jwks_url (the issuer's "
        "key-set file works: only the public halves are read).",
    )
    jwks_ttl_s: float = Field(
        300.0, gt=0, le=86400, description="Seconds the fetched public keys are cached."
    )
    token_audience: str = Field(
        TOKEN_AUDIENCE, description="The aud a token must carry (the FHIR API's by default)."
    )
    token_issuer: str = Field(TOKEN_ISSUER, description="The iss a token must carry.")
    audit_url: str = Field(
        "sqlite:///var/console/audit.db",
        description="SQLAlchemy URL of the console's audit trail (every staff action as a "
        "FHIR AuditEvent). Kept apart from the index, which is a cache.",
    )
    fhir_base_url: str = Field(
        "http://127.0.0.1:8080/fhir",
        description="The FHIR API the console reads and writes with the signed-in staff "
        "member's token; its .well-known/smart-configuration names the authorization server.",
    )
    client_id: str = Field(
        "scanwatch-console",
        description="The console's client id at the authorization server (a staff app: "
        "scanwatch clients register-staff-app, or the development stack).",
    )
    client_secret: SecretStr | None = Field(
        None,
        description="The console's client secret. Unset: the web pages (sign-in, worklist) "
        "are off and only DICOMweb is served.",
    )
    session_cookie: str = Field(
        "scanwatch_console_session", description="Name of the session cookie (its id only)."
    )
    session_idle_s: float = Field(
        1800.0, ge=60, le=86400, description="A session unused this long ends."
    )
    session_max_s: float = Field(
        12 * 3600.0, ge=300, le=7 * 86400, description="A session ends this long after sign-in."
    )
    login_timeout_s: float = Field(
        600.0, ge=30, le=3600, description="Longest time between starting and ending a sign-in."
    )
    http_timeout_s: float = Field(
        10.0, gt=0, le=120, description="Timeout of calls to FHIR and the auth server."
    )
    kafka_bootstrap_servers: str | None = Field(
        None,
        description="Kafka (host:port[,host:port]) whose dead-letter topics the worklist reads "
        "for failed studies and their reasons, and through which the operator pages follow "
        "training jobs, ask for promotions and rollbacks, show consumer lag and re-drive dead "
        "letters. Unset: none of that is shown.",
    )
    model_repository: Path | None = Field(
        None,
        description="The model repository (TF Serving layout, with the registry's "
        "registry.sqlite), read only: the operator's models page lists its versions and "
        "their evaluation reports. Unset: the page says it is not configured.",
    )
    listener_health_url: str | None = Field(
        None,
        description="The DICOM listener's /healthz (on its metrics port): the pipeline page "
        "shows its checks and outbox depth. Unset: not shown.",
    )
    model_server: str | None = Field(
        None,
        description="host:port of the TF Serving gRPC API the worker uses (TensorFlow Serving "
        "or services/model_server): the pipeline page shows the model's versions and their "
        "state (GetModelStatus). Unset: not shown.",
    )
    model_name: str = Field(
        DEFAULT_MODEL_NAME, description="The served model whose status the pipeline page shows."
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")

    @field_validator("jwks_url", "public_url", "fhir_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        if is_loopback(self.host):
            return self
        jwks = urlsplit(self.jwks_url)
        if (
            self.jwks_file is None
            and jwks.scheme != "https"
            and not is_loopback(jwks.hostname or "")
        ):
            raise ValueError(
                f"the console is not on loopback: SCANWATCH_CONSOLE_JWKS_URL ({self.jwks_url}) "
                "must be https (keys fetched over plain HTTP could be swapped on the way)"
            )
        if self.public_url is not None and not self.public_url.startswith("https://"):
            raise ValueError(
                "the console is not on loopback: SCANWATCH_CONSOLE_PUBLIC_URL must be https"
            )
        fhir = urlsplit(self.fhir_base_url)
        if fhir.scheme != "https" and not is_loopback(fhir.hostname or ""):
            raise ValueError(
                f"the console is not on loopback: SCANWATCH_CONSOLE_FHIR_BASE_URL "
                f"({self.fhir_base_url}) must be https (staff tokens travel to it)"
            )
        return self

    @property
    def web(self) -> bool:
        """Whether the web pages are on (a client secret to sign staff in with)."""
        return self.client_secret is not None and bool(self.client_secret.get_secret_value())

    @property
    def secure_cookies(self) -> bool:
        """Cookies are Secure unless the console is reached over plain http on loopback."""
        if self.public_url is not None:
            return self.public_url.startswith("https://")
        return not is_loopback(self.host)

    @property
    def base_url(self) -> str:
        """The console's own URL (``public_url``, or http://host:port in development)."""
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def redirect_uri(self) -> str:
        """Where the authorization server sends staff back (registered for the client)."""
        return f"{self.base_url}/callback"

    @property
    def smart_configuration_url(self) -> str:
        return f"{self.fhir_base_url}/.well-known/smart-configuration"
