"""Settings of the model server, read from ``SCANWATCH_MODEL_SERVER_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the model server needs; validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_MODEL_SERVER_")

    model_base_path: Path = Field(
        Path("var/models"),
        description="Model repository root; versions are read from <model_base_path>/<model_name>/"
        "<version>/ (like the tensorflow/serving image's MODEL_BASE_PATH and MODEL_NAME).",
    )
    model_name: str = Field(
        "brain-mri-anomaly", description="Name of the served model (and its folder)."
    )
    host: str = Field("127.0.0.1", description="Interface the gRPC server listens on.")
    port: int = Field(
        8500, ge=0, le=65535, description="gRPC port (TF Serving's is 8500); 0 picks a free one."
    )
    poll_interval_s: float = Field(
        2.0, gt=0, description="How often the model folder is scanned for new versions."
    )
    max_message_bytes: int = Field(
        64 * MIB, ge=4 * MIB, description="Largest gRPC message sent or received, in bytes."
    )
    max_workers: int = Field(8, ge=1, le=256, description="Threads answering gRPC calls.")
    version_labels: dict[str, int] = Field(
        default_factory=dict,
        description='Version labels for ModelSpec.version_label, as JSON: {"stable": 3}.',
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or value in (".", "..") or "/" in value or value.startswith("."):
            raise ValueError(f"model_name must be a plain folder name, not {value!r}")
        return value

    @field_validator("version_labels")
    @classmethod
    def _labels(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {label: v for label, v in value.items() if not label or v < 0}
        if bad:
            raise ValueError(f"version_labels need non-empty labels and versions >= 0: {bad}")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return value.upper()

    @property
    def model_dir(self) -> Path:
        """The folder holding the model's integer version folders."""
        return self.model_base_path / self.model_name
