"""Settings of the inference worker, read from ``SCANWATCH_WORKER_*`` environment variables."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from inference_worker.header import ORIENTATIONS
from inference_worker.series import SelectionRules
from scanwatch.logs import LogLevel
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from scanwatch.service_settings import MetricsSettings
from schemas.topics import DEVELOPMENT


class Settings(MetricsSettings):
    """Everything the worker needs to know; validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_WORKER_")

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port…]."
    )
    topic_replication_factor: int = Field(
        DEVELOPMENT.factor,
        ge=1,
        description="Replication factor of the topics Faust creates (the study table's "
        "changelog, its assignor's topic): 1 on the single development broker, 3 "
        "(schemas.topics.PRODUCTION) on a production cluster.",
    )
    app_id: str = Field(
        "scanwatch-inference-worker",
        description="Faust app id: its consumer group and the prefix of its internal topics.",
    )
    store: str = Field(
        "memory://",
        description="Faust table store. memory:// rebuilds tables from their changelog on start.",
    )
    data_dir: Path = Field(Path("var/worker"), description="Faust's data directory.")
    web_host: str = Field("127.0.0.1", description="Interface of the worker's /healthz web page.")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of the worker's /healthz page.")
    quiet_period_s: float = Field(
        5.0, gt=0, description="A study is ready when no instance arrived for this many seconds."
    )
    quiet_period_by_source: dict[str, float] = Field(
        default_factory=dict,
        description='Quiet period per calling AE title (JSON, e.g. {"MR1": 10}); others use '
        "quiet_period_s.",
    )
    complete_by_headers: list[str] = Field(
        default_factory=list,
        description="Calling AE titles whose instances' counts are trusted (JSON list, e.g. "
        '["MR1"]): a study of theirs is ready as soon as each series holds the '
        "ImagesInAcquisition instances of each acquisition (an Enhanced MR: its one "
        "multi-frame instance), without the quiet period. Only for senders known to fill these "
        "tags correctly; a study that keeps growing after is scored again.",
    )
    max_wait_s: float = Field(
        600.0,
        gt=0,
        description="A study that keeps receiving instances is scored anyway this long after its "
        "first (or last scored) instance.",
    )
    listener_stale_after_s: float = Field(
        30.0,
        gt=0,
        description="A listener whose watermark has not moved while this many seconds of other "
        "events or watermarks were read on a partition is taken as gone, and no longer holds "
        "that partition's studies (longer than a Kafka leader election).",
    )
    exam_max_wait_s: float = Field(
        4 * 3600.0,
        gt=0,
        description="A study whose modality reports its procedure step still IN PROGRESS is "
        "held for it this long at most after its first instance (an exam may take hours), or "
        "until no instance has come for max_wait_s (a modality that never ends its step).",
    )
    park_s: float = Field(
        60.0,
        gt=0,
        description="A study whose scoring failed transiently beyond the retries is tried again "
        "after this many seconds (parked, never dropped).",
    )
    study_retention_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="A study whose every instance was scored is removed from the worker's table "
        "once nothing has come for it for this long (the instance topic's own retention, a "
        "week, by default); an instance that comes later starts the study again. Without it the "
        "table, held in memory, grew with every study ever received.",
    )
    check_interval_s: float = Field(
        0.25, gt=0, description="How often studies are checked for the end of their quiet period."
    )
    model_server: str = Field(
        "127.0.0.1:8500",
        description="host:port of the TensorFlow Serving gRPC API (TF Serving or model_server).",
    )
    model_name: str = Field(DEFAULT_MODEL_NAME, min_length=1, description="Model to ask for.")
    model_version: int | None = Field(
        None, ge=1, description="Model version to pin; unset means the server's latest."
    )
    model_label: str | None = Field(
        None,
        description="Version label to ask for (e.g. stable, canary); exclusive with model_version.",
    )
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive model server failures that open the circuit breaker."
    )
    breaker_reset_s: float = Field(
        30.0, gt=0, description="Seconds an open circuit waits before a trial call."
    )
    predict_timeout_s: float = Field(60.0, gt=0, description="Deadline of one Predict call.")
    batch_size: int = Field(16, ge=1, le=512, description="Images per Predict call.")
    decode_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes that read a study's pixel data, decode and resize it, its "
        "instances split between them (inference_worker.pixels.PixelPool; the headers are read "
        "once, in the worker); 0 or 1: in the worker's own process, on a thread. A pool "
        "process that dies is replaced.",
    )
    max_gap_mm: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Unset: every slice of the chosen series is scored (the default: a small "
        "finding may lie on two slices). A distance in mm: slices may be skipped as long as no "
        "more than this lies unscanned between two scored ones (positions along the slice "
        "normal less half of each SliceThickness); a series without positions is scored whole.",
    )
    series_description_pattern: str | None = Field(
        None,
        description="Regular expression (case-insensitive); an MR series whose "
        "SeriesDescription matches is preferred, e.g. 'T2|FLAIR'.",
    )
    min_slices: int = Field(1, ge=1, description="MR series with fewer images are not scored.")
    orientation: str = Field(
        "any", description="Series orientation to score: any, axial, coronal or sagittal."
    )
    scoring_concurrency: int = Field(
        2,
        ge=1,
        le=16,
        description="Studies scored at once per worker: while one waits for Predict, the next "
        "is read and preprocessed, so the model server is not idle between studies. A freed "
        "slot goes to the waiting study that arrived first.",
    )
    studies_in_flight: int = Field(
        8,
        ge=1,
        le=64,
        description="Ready studies a worker holds at once (scored or waiting for a slot, "
        "oldest arrival first); beyond it the worker reads no further ready events, and "
        "Kafka consumption pauses: back-pressure, not an unbounded queue. At least "
        "scoring_concurrency.",
    )
    max_message_bytes: int = Field(
        256 * 1024 * 1024, ge=4 * 1024 * 1024, description="gRPC message size limit, both ways."
    )
    retries: int = Field(
        5, ge=0, description="Retries of a transient failure (model server, FHIR API) per study."
    )
    heatmaps: bool = Field(
        True,
        description="Store a Grad-CAM heatmap series for every scored study beside it: the "
        "heatmaps the model's Predict returned with the score, or, from a model without them, "
        "its saliency signature's (a second pass over the scored slices: bench/heatmap.py); "
        "false scores without them.",
    )
    fhir_base_url: str = Field(
        "http://127.0.0.1:8080/fhir", description="Base URL of the FHIR API the results go to."
    )
    fhir_client_id: str | None = Field(
        None,
        description="Client id registered with the FHIR API (scopes system/*.write). The API "
        "requires tokens by default (make run too); unset only against one without (tests).",
    )
    fhir_client_secret: str | None = Field(
        None, description="Secret of fhir_client_id.", repr=False
    )
    fhir_token_url: str | None = Field(
        None, description="OAuth token endpoint; default: <fhir_base_url without /fhir>/auth/token."
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")

    @model_validator(mode="after")
    def _one_model_selector(self) -> Settings:
        if self.model_version is not None and self.model_label is not None:
            raise ValueError("set model_version or model_label, not both")
        if (self.fhir_client_id is None) != (self.fhir_client_secret is None):
            raise ValueError("set both fhir_client_id and fhir_client_secret, or neither")
        return self

    def quiet_period_for(self, source: str | None) -> float:
        """The quiet period of studies sent by ``source`` (a calling AE title)."""
        return self.quiet_period_by_source.get(source or "", self.quiet_period_s)

    def selection_rules(self) -> SelectionRules:
        """The series selection rules these settings describe (validated)."""
        return SelectionRules(
            self.series_description_pattern, self.min_slices, self.orientation, self.max_gap_mm
        )

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, value: str) -> str:
        if value not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, not {value!r}")
        return value

    @field_validator("series_description_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"series_description_pattern is not a valid regex: {exc}") from exc
        return value

    @field_validator("fhir_base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"fhir_base_url must be an http(s) URL, not {value!r}")
        return value.rstrip("/")
