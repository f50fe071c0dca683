"""The listener's settings, read once from ``SCANWATCH_LISTENER_*`` environment variables."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from dicom_listener.sop_classes import ALL_STORAGE, MR_STORAGE_CLASSES, resolve_storage_classes
from scanwatch.logs import LOG_LEVELS, LogLevel
from scanwatch.network import require_off_loopback
from scanwatch.service_settings import MetricsSettings

MiB = 1024 * 1024
#: Longest listener id (``ListenerWatermarkV1.listener_id``).
LISTENER_ID_MAX = 128


def _split(value: object) -> object:
    """A comma-separated environment value as a list (a list is kept as it is)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_ae_title(value: str, what: str) -> str:
    # PS3.5 §6.2: AE is 1-16 characters of the default repertoire, no backslash, and
    # leading/trailing spaces are not significant.
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ValueError(f"{what} must be 1 to 16 characters, got {value!r}")
    if "\\" in title or not all(" " <= c <= "~" for c in title):
        raise ValueError(f"{what} must be printable ASCII without backslash, got {value!r}")
    return title


class Settings(MetricsSettings):
    """Everything the listener needs to start; every field can be set from the environment.

    List fields take a comma-separated value in the environment, e.g.
    ``SCANWATCH_LISTENER_ALLOWED_CALLING_AES=CT1,MR1@10.0.0.0/24``.
    """

    model_config = SettingsConfigDict(env_prefix="SCANWATCH_LISTENER_", extra="ignore")

    ae_title: str = Field(
        default="SCANWATCH",
        description="AE title of this SCP; associations addressed to another title are rejected "
        "(A-ASSOCIATE-RJ, called AE title not recognised).",
    )
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate, each optionally bound to a source "
        "address or network: 'CT1', 'MR1@10.1.2.3', 'PACS@10.0.0.0/24'. Empty: any calling AE "
        "(development only). Others are rejected (calling AE title not recognised).",
    )
    host: str = Field(default="127.0.0.1", description="Address the DICOM and metrics ports bind.")
    port: int = Field(
        default=11112, ge=0, le=65535, description="DICOM port (0: any free port, for tests)."
    )
    storage_dir: Path = Field(
        default=Path("var/store"),
        description="Root of the file store: <StudyInstanceUID>/<SeriesInstanceUID>/<SOP>.dcm "
        "(later versions of an instance: <SOP>.v<N>.dcm).",
    )
    outbox_path: Path | None = Field(
        default=None,
        description="SQLite (WAL) file of the durable event outbox and the instance index "
        "(default: <storage_dir>/.scanwatch/outbox.sqlite3). Keep it on the store's disk.",
    )
    listener_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=LISTENER_ID_MAX,
        description="Names this listener in its publication watermarks "
        "(dicom.listener.watermark.v1), which the worker waits on per listener; it must stay the "
        "same across restarts of one listener and differ between listeners (default: "
        "'<host name>:<first 12 hex digits of the SHA-256 of the outbox's resolved path>').",
    )
    quarantine_dir: Path | None = Field(
        default=None,
        description="Where refused undecodable or incomplete instances are copied for "
        "inspection (default: <storage_dir>/.quarantine).",
    )
    sop_classes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(MR_STORAGE_CLASSES),
        description="Accepted Storage SOP Classes, as keywords (MRImageStorage) or UIDs; "
        f"'{ALL_STORAGE}' accepts every storage class. Others are refused at association "
        "negotiation (abstract syntax not supported).",
    )
    mpps: bool = Field(
        default=True,
        description="Serve Modality Performed Procedure Step (N-CREATE, N-SET): a modality that "
        "reports its steps gets its studies scored as soon as a completed step's instances are "
        "stored, instead of after the worker's quiet period.",
    )
    storage_commitment: bool = Field(
        default=True,
        description="Serve Storage Commitment (push model, N-ACTION): a sender may ask which of "
        "its instances are durably stored before it deletes its own copies.",
    )
    commitment_peers: dict[str, str] = Field(
        default_factory=dict,
        description="Where to send a Storage Commitment result whose sender left before taking "
        'it on its own association: calling AE title → "host:port" of that sender\'s DICOM '
        'listener (JSON, e.g. {"MR1": "10.0.0.5:104"}). Without an entry the result is logged '
        "as undelivered, and the sender asks again.",
    )
    min_free_disk_bytes: int = Field(
        default=512 * MiB,
        ge=0,
        description="Free-space watermark of the store's disk: below it every C-STORE is "
        "answered Out of Resources (0xA702) until space returns.",
    )
    outbox_max_events: int = Field(
        default=100_000,
        ge=1,
        description="Undelivered events at which C-STOREs are answered Out of Resources "
        "(0xA703) until the publisher has drained the outbox below it.",
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port."
    )
    kafka_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=300,
        description="Longest wait for Kafka (connect, acknowledgement of one batch) before the "
        "publisher retries; the events stay in the outbox meanwhile. Longer than a cluster "
        "takes to fence a dead broker (about 9 s): until then a leader holds back its "
        "acknowledgement, and a batch that timed out at 10 s was sent again although written "
        "(tests/faults/test_broker_leader.py).",
    )
    publish_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Most events the publisher sends per batch."
    )
    publish_linger_s: float = Field(
        default=0.02,
        ge=0,
        le=5,
        description="Pause after new events before the publisher sends them, so that one Kafka "
        "request carries several (adds at most this much to an event's delivery time).",
    )
    publish_poll_s: float = Field(
        default=0.05,
        gt=0,
        le=60,
        description="How often the publisher looks for events committed by other processes "
        "(the publisher process, or the primary with several workers). An association that "
        "ends signals it at once, so this bounds the delay of events only while an "
        "association is still sending.",
    )
    publish_retry_max_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Longest pause between the publisher's retries while Kafka is unreachable.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain of this SCP: when set (with tls_key_file) the DICOM "
        "port speaks DICOM TLS (PS3.15 B.1) only.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of the SCP.")
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle: when set, senders must present a certificate it signed.",
    )
    max_pdu_size: int = Field(
        default=262_144,
        ge=0,
        description="Largest P-DATA PDU this SCP accepts, in bytes (0: no limit). Larger PDUs "
        "mean fewer round trips per instance.",
    )
    max_associations: int = Field(
        default=32, ge=1, le=1000, description="Simultaneous associations before rejecting."
    )
    network_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a peer may stay silent (negotiation, TLS handshake, between PDUs) "
        "before its association is dropped.",
    )
    publisher_process: bool = Field(
        default=True,
        description="Run the Kafka publisher in its own process (the service entry point "
        "starts and supervises it). The Kafka client's Python code then does not compete "
        "with the C-STOREs for the interpreter lock; false: a thread of the primary process.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="DICOM server processes sharing the port (SO_REUSEPORT): one interpreter "
        "is limited by its GIL, so several associations scale with processes. The first process "
        "also runs the publisher and the HTTP server; /metrics shows its own counters.",
    )
    metrics_port: int = Field(
        default=9111,
        ge=0,
        le=65535,
        description="HTTP port of /metrics (Prometheus) and /healthz (0: no HTTP server).",
    )
    publisher_metrics_port: int = Field(
        default=9113,
        ge=0,
        le=65535,
        description="HTTP port of the publisher process's /metrics (Kafka publish latency, "
        "events published, delivery time); 0: off. Used when publisher_process is on.",
    )
    log_level: LogLevel = Field(default="INFO", description=f"One of {', '.join(LOG_LEVELS)}.")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value, "ae_title")

    @field_validator("commitment_peers")
    @classmethod
    def _peers(cls, value: dict[str, str]) -> dict[str, str]:
        for title, address in value.items():
            _check_ae_title(title, "commitment_peers entry")
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"commitment_peers[{title!r}]: {address!r} is not host:port")
        return value

    def commitment_addresses(self) -> dict[str, tuple[str, int]]:
        """``commitment_peers`` as (host, port) pairs."""
        return {
            title: (address.rpartition(":")[0], int(address.rpartition(":")[2]))
            for title, address in self.commitment_peers.items()
        }

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _split_allowed(cls, value: object) -> object:
        return _split(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        entries = []
        for entry in value:
            title, _, address = entry.partition("@")
            title = _check_ae_title(title, "allowed_calling_aes entry")
            if address:
                try:
                    ipaddress.ip_network(address.strip(), strict=False)
                except ValueError:
                    raise ValueError(
                        f"allowed_calling_aes entry {entry!r}: {address!r} is not an IP "
                        "address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
                    ) from None
                entries.append(f"{title}@{address.strip()}")
            else:
                entries.append(title)
        return entries

    @field_validator("sop_classes", mode="before")
    @classmethod
    def _split_classes(cls, value: object) -> object:
        return _split(value)

    @field_validator("sop_classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        resolve_storage_classes(value)  # raises ValueError naming the unknown entries
        return value

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

    @model_validator(mode="after")
    def _reachable_needs_allow_list(self) -> Settings:
        # The FHIR API's rule for authentication, here for DICOM: a listener other hosts can
        # reach stores only what known senders send.
        require_off_loopback(
            self.host,
            "SCANWATCH_LISTENER_ALLOWED_CALLING_AES",
            bool(self.allowed_calling_aes),
            "the senders allowed to store, e.g. 'MR1@10.1.2.3,PACS@10.0.0.0/24'; an empty "
            "list is for loopback only",
        )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_ca_file needs tls_cert_file and tls_key_file")
        for path in (self.tls_cert_file, self.tls_key_file, self.tls_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @property
    def resolved_outbox_path(self) -> Path:
        return self.outbox_path or self.storage_dir / ".scanwatch" / "outbox.sqlite3"

    @property
    def resolved_listener_id(self) -> str:
        """``listener_id``, or one derived from this host and the outbox: the same outbox on
        the same host gives the same id after a restart."""
        if self.listener_id is not None:
            return self.listener_id
        digest = hashlib.sha256(os.fsencode(self.resolved_outbox_path.resolve())).hexdigest()
        suffix = f":{digest[:12]}"
        return socket.gethostname()[: LISTENER_ID_MAX - len(suffix)] + suffix

    @property
    def resolved_quarantine_dir(self) -> Path:
        return self.quarantine_dir or self.storage_dir / ".quarantine"
