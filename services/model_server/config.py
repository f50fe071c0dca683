"""Settings of the model server, read from ``SCANWATCH_MODEL_SERVER_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from scanwatch.logs import LogLevel
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from scanwatch.service_settings import MetricsSettings
from services.model_server.tf_serving_files import (
    BatchingParameters,
    ConfigError,
    ModelConfig,
    check_name,
    read_batching_parameters,
    read_model_config,
)

MIB = 1024 * 1024
#: Settings that describe the single model of the shortcut; a model config file replaces them.
SINGLE_MODEL_FIELDS = ("model_base_path", "model_name", "version_labels")
#: Batching settings that a batching parameters file replaces.
BATCHING_FIELDS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches")


class Settings(MetricsSettings):
    """Everything the model server needs; validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_MODEL_SERVER_")

    model_base_path: Path = Field(
        Path("var/models"),
        description="Model repository root; versions are read from <model_base_path>/<model_name>/"
        "<version>/ (like the tensorflow/serving image's MODEL_BASE_PATH and MODEL_NAME).",
    )
    model_name: str = Field(
        DEFAULT_MODEL_NAME, description="Name of the served model (and its folder)."
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
    model_config_file: Path | None = Field(
        None,
        description="TF Serving model config file (text ModelServerConfig with model_config_list:"
        " several models, base_path, model_version_policy, version_labels), like "
        "tensorflow_model_server's --model_config_file. Replaces model_base_path, model_name and "
        "version_labels, which must then be left unset.",
    )
    model_config_file_poll_wait_seconds: float = Field(
        0,
        ge=0,
        description="Re-read model_config_file this often (new models, removed models, changed "
        "policies and labels), like TF Serving's flag of the same name; 0 reads it once.",
    )
    engine: Literal["tensorflow", "openvino"] = Field(
        "tensorflow",
        description="What runs the SavedModels: tensorflow (as TF Serving does) or openvino "
        "(converted from the same SavedModel, compiled for the CPU).",
    )
    openvino_cache_dir: Path = Field(
        Path("var/cache/openvino"),
        description="Where the openvino engine caches converted models (IR), keyed by a hash of "
        "the SavedModel; the model repository itself is never written to.",
    )
    openvino_performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        "LATENCY",
        description="OpenVINO's PERFORMANCE_HINT: LATENCY gives each engine call every core "
        "(best with server-side batching), THROUGHPUT splits the cores into parallel streams.",
    )
    openvino_inference_precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="OpenVINO's INFERENCE_PRECISION_HINT on the CPU: f32 matches TensorFlow "
        "(see the README's tolerance); bf16 is faster on CPUs with AVX512_BF16/AMX but drifts.",
    )
    enable_batching: bool = Field(
        False,
        description="Merge concurrent Predict requests into one engine call (TF Serving's "
        "--enable_batching).",
    )
    batching_parameters_file: Path | None = Field(
        None,
        description="TF Serving batching parameters file (text BatchingParameters: "
        "max_batch_size, batch_timeout_micros, max_enqueued_batches, num_batch_threads, "
        "allowed_batch_sizes); replaces the batching settings below. Needs enable_batching.",
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most images in one merged engine call (with enable_batching)."
    )
    batch_timeout_micros: int = Field(
        2000,
        ge=0,
        description="Longest wait, after the oldest queued request, for a batch to fill (µs).",
    )
    max_enqueued_batches: int = Field(
        16, ge=1, description="Queued batches beyond which Predict answers UNAVAILABLE."
    )
    num_batch_threads: int = Field(
        1, ge=1, le=64, description="Threads running merged batches (per loaded version)."
    )
    warmup: bool = Field(
        True,
        description="Warm a version up before it becomes AVAILABLE: replay assets.extra/"
        "tf_serving_warmup_requests if present, else run each signature once on zeros.",
    )
    metrics_port: int = Field(
        9112, ge=0, le=65535, description="Prometheus /metrics port on host; 0 turns it off."
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return check_name(value)
        except ValueError:
            raise ValueError(f"model_name must be a plain folder name, not {value!r}") from None

    @field_validator("version_labels")
    @classmethod
    def _labels(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {label: v for label, v in value.items() if not label or v < 0}
        if bad:
            raise ValueError(f"version_labels need non-empty labels and versions >= 0: {bad}")
        return value

    @model_validator(mode="after")
    def _files(self) -> Settings:
        if self.model_config_file is not None:
            both = sorted(set(SINGLE_MODEL_FIELDS) & self.model_fields_set)
            if both:
                raise ValueError(
                    f"model_config_file replaces {', '.join(SINGLE_MODEL_FIELDS)}: unset {both}"
                )
            try:
                read_model_config(self.model_config_file)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        if self.batching_parameters_file is not None:
            if not self.enable_batching:
                raise ValueError("batching_parameters_file needs enable_batching=true")
            both = sorted(set(BATCHING_FIELDS) & self.model_fields_set)
            if both:
                raise ValueError(f"batching_parameters_file replaces {both}: unset them")
            try:
                read_batching_parameters(self.batching_parameters_file)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return self

    @property
    def model_dir(self) -> Path:
        """The folder holding the single model's integer version folders (the shortcut)."""
        return self.model_base_path / self.model_name

    def model_configs(self) -> list[ModelConfig]:
        """The served models: from the model config file, or the single-model shortcut."""
        if self.model_config_file is not None:
            return read_model_config(self.model_config_file)
        return [ModelConfig(self.model_name, self.model_dir, version_labels=self.version_labels)]

    def batching(self) -> BatchingParameters | None:
        """Server-side batching parameters, or None when batching is off."""
        if not self.enable_batching:
            return None
        if self.batching_parameters_file is not None:
            return read_batching_parameters(self.batching_parameters_file)
        return BatchingParameters(
            max_batch_size=self.max_batch_size,
            batch_timeout_micros=self.batch_timeout_micros,
            max_enqueued_batches=self.max_enqueued_batches,
            num_batch_threads=self.num_batch_threads,
        )
