"""The listener's settings, read once from ``SCANWATCH_LISTENER_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    """Everything the listener needs to start; every field can be set from the environment."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_LISTENER_", extra="ignore")

    ae_title: str = Field(
        default="SCANWATCH",
        description="AE title of this SCP; associations addressed to another title are rejected.",
    )
    host: str = Field(default="127.0.0.1", description="Address the DICOM and metrics ports bind.")
    port: int = Field(
        default=11112, ge=0, le=65535, description="DICOM port (0: any free port, for tests)."
    )
    storage_dir: Path = Field(
        default=Path("var/store"),
        description="Root of the file store: <StudyInstanceUID>/<SeriesInstanceUID>/<SOP>.dcm.",
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port."
    )
    kafka_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Longest wait for Kafka to acknowledge one event before the C-STORE fails.",
    )
    max_pdu_size: int = Field(
        default=262_144,
        ge=0,
        description="Largest P-DATA PDU this SCP accepts, in bytes (0: no limit). Larger PDUs "
        "mean fewer round trips per instance.",
    )
    metrics_port: int = Field(
        default=9111, ge=0, le=65535, description="Prometheus metrics port (0: no metrics server)."
    )
    log_level: str = Field(default="INFO", description=f"One of {', '.join(LOG_LEVELS)}.")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        # PS3.5 §6.2: AE is 1-16 characters of the default repertoire, no backslash, and
        # leading/trailing spaces are not significant.
        title = value.strip()
        if not 1 <= len(title) <= 16:
            raise ValueError(f"ae_title must be 1 to 16 characters, got {value!r}")
        if "\\" in title or not all(" " <= c <= "~" for c in title):
            raise ValueError(f"ae_title must be printable ASCII without backslash, got {value!r}")
        return title

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        bad = [s for s in servers if not s.rpartition(":")[2].isdigit()]
        if not servers or bad:
            raise ValueError(
                f"kafka_bootstrap_servers must be host:port[,host:port...], got {value!r}"
            )
        return ",".join(servers)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level
