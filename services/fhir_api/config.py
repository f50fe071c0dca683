"""Settings of the FHIR API, read from ``SCANWATCH_FHIR_*`` environment variables."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DATABASE_SCHEMES = ("sqlite", "postgresql")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback interface (only this machine can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
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
    allow_remote_without_auth: bool = Field(
        False,
        description="Allow listening on a non-loopback interface although this skeleton has no "
        "authentication yet (the store holds PHI). Only behind an authenticating proxy.",
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
        if not is_loopback(self.host) and not self.allow_remote_without_auth:
            raise ValueError(
                f"host {self.host!r} is not loopback and the API has no authentication yet; "
                "set SCANWATCH_FHIR_ALLOW_REMOTE_WITHOUT_AUTH=true only behind an "
                "authenticating proxy"
            )
        return self
