"""Settings of the FHIR API, read from ``SCANWATCH_FHIR_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from scanwatch.network import require_off_loopback
from scanwatch.service_settings import HttpsSettings

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DATABASE_SCHEMES = ("sqlite", "postgresql")
AUTH_MODES = ("required", "off")
#: Most worker processes started by default (one per core up to this).
DEFAULT_MAX_WORKERS = 4
#: Where the token signing keys are kept in development (relative: under the working folder).
DEFAULT_SIGNING_KEYS_FILE = Path("var/auth/signing-keys.json")
#: Settings that used to hold an HS256 secret: refused, so that nobody believes they still
#: sign anything.
RETIRED_ENVIRONMENT = ("SCANWATCH_FHIR_JWT_SECRET", "SCANWATCH_FHIR_JWT_KEY_FILE")


class Settings(HttpsSettings):
    """Everything the FHIR API needs; validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_FHIR_")

    database_url: str = Field(
        "sqlite:///var/fhir.db",
        description="SQLAlchemy URL of the resource store: sqlite:///<file> (WAL mode) or "
        "postgresql+psycopg://user:pass@host/db.",
    )
    host: str = Field("127.0.0.1", description="Interface the HTTP server listens on.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    base_url: str | None = Field(
        None,
        description="Public base URL of the FHIR endpoint (e.g. https://host/fhir) used in "
        "fullUrl, Location and Bundle links; unset means derived from each request.",
    )
    default_count: int = Field(20, ge=1, description="Search page size when _count is absent.")
    max_count: int = Field(200, ge=1, description="Largest _count honoured; larger is capped.")
    auth_mode: str = Field(
        "required",
        description="'required' (the default): every /fhir route except metadata needs a "
        "bearer token with SMART scopes; 'off': no tokens, for tests only (refused unless the "
        "API listens on loopback).",
    )
    signing_keys_file: Path = Field(
        DEFAULT_SIGNING_KEYS_FILE,
        description="JWK Set file of the ES256 private keys that sign access tokens (mode "
        "0600; refused when other users may read it), created with one key on first start. The "
        "newest key signs, every key in it verifies; the public keys are served at /auth/jwks. "
        "Outside development (host not loopback) it must be set, to a path that outlives the "
        "process and is shared by every API instance.",
    )
    token_lifetime_s: int = Field(
        900, ge=30, le=86400, description="Lifetime of the access tokens the server issues."
    )
    bootstrap_clients: str | None = Field(
        None,
        description="Clients registered at start-up, ';'-separated 'client_id:secret:scope "
        "scope...' entries (e.g. the worker: 'scanwatch-worker:<secret>:system/*.write "
        "system/*.read'). Lets a dev stack hand its services credentials without the CLI.",
        repr=False,
    )
    migrate_on_start: bool = Field(
        True,
        description="Run the Alembic migrations (upgrade to head) when the API starts; turn "
        "off where migrations are run as a separate step (`scanwatch-fhir-api migrate`).",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=32,
        description="HTTP worker processes `serve` starts (each a uvicorn server on the same "
        "port). Unset: one per CPU core, at most 4, on PostgreSQL; always 1 on SQLite (more is "
        "refused: its one write lock gains nothing from processes). Migrations run once before "
        "the workers start; subscription notifications are sent by exactly one of them.",
    )
    subscription_max_attempts: int = Field(
        5, ge=1, le=20, description="Delivery attempts per notification before giving up."
    )
    subscription_backoff_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Wait before the second delivery attempt; doubled for each further one.",
    )
    subscription_timeout_s: float = Field(
        5.0, gt=0, le=60, description="HTTP timeout of one notification delivery."
    )
    subscription_poll_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="How often the subscription notifier looks for writes taken by other "
        "worker processes (its own wake it at once), and how often the other processes check "
        "whether the notifier is gone and one of them should take over.",
    )
    audit_reads: bool = Field(
        True, description="Record every read, vread, search and history in audit_event."
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in DATABASE_SCHEMES:
            raise ValueError(
                f"database_url must start with one of {', '.join(DATABASE_SCHEMES)}, not {value!r}"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_count > self.max_count:
            raise ValueError(
                f"default_count ({self.default_count}) must not exceed max_count ({self.max_count})"
            )
        require_off_loopback(
            self.host,
            "SCANWATCH_FHIR_AUTH_MODE=required",
            self.auth_mode == "required",
            "the store holds PHI; 'off' is for tests on loopback",
        )
        if self.workers is not None and self.workers > 1 and self.backend == "sqlite":
            raise ValueError(
                f"workers={self.workers}: a SQLite store is served by one process; "
                "use PostgreSQL for more"
            )
        require_off_loopback(
            self.host,
            "SCANWATCH_FHIR_SIGNING_KEYS_FILE",
            "signing_keys_file" in self.model_fields_set,
            "a persistent file shared by every API instance: the token signing keys",
        )
        retired = [name for name in RETIRED_ENVIRONMENT if name in os.environ]
        if retired:
            raise ValueError(
                f"{', '.join(retired)} is no longer read: tokens are signed with the ES256 keys "
                "in SCANWATCH_FHIR_SIGNING_KEYS_FILE; unset it"
            )
        self.bootstrap_client_entries()  # raises on a malformed entry
        return self

    @field_validator("auth_mode")
    @classmethod
    def _auth_mode(cls, value: str) -> str:
        if value not in AUTH_MODES:
            raise ValueError(f"auth_mode must be one of {', '.join(AUTH_MODES)}, not {value!r}")
        return value

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.database_url.split(":", 1)[0].split("+", 1)[0]

    @property
    def worker_count(self) -> int:
        """The worker processes `serve` starts (:attr:`workers`, or its default)."""
        if self.backend == "sqlite":
            return 1
        return self.workers or max(1, min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS))

    def bootstrap_client_entries(self) -> list[tuple[str, str, str]]:
        """(client_id, secret, scopes) of :attr:`bootstrap_clients`."""
        entries = []
        for item in (self.bootstrap_clients or "").split(";"):
            if not item.strip():
                continue
            parts = item.strip().split(":", 2)
            if len(parts) != 3 or not all(parts):
                raise ValueError("bootstrap_clients entries are 'client_id:secret:scopes'")
            entries.append((parts[0], parts[1], parts[2]))
        return entries
