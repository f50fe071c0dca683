"""Settings every service with an HTTP port shares, as bases of its ``Settings``: the
``/metrics`` bearer token, and for the HTTP APIs the TLS pair (what they guard:
:mod:`scanwatch.http_access`). Each service's own ``env_prefix`` names them
(``SCANWATCH_FHIR_METRICS_TOKEN``, ``SCANWATCH_PORTAL_TLS_CERT_FILE``, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from scanwatch.http_access import check_tls_pair


class MetricsSettings(BaseSettings):
    """A service whose ``/metrics`` Prometheus scrapes."""

    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token /metrics requires (what Prometheus sends). Unset: /metrics "
        "is open when the service listens on loopback and refuses everyone elsewhere; /healthz "
        "is always open.",
        repr=False,
    )

    @property
    def metrics_secret(self) -> str | None:
        """The metrics bearer token's value (None: /metrics open, loopback only)."""
        return self.metrics_token.get_secret_value() if self.metrics_token else None


class HttpsSettings(MetricsSettings):
    """An HTTP service that serves HTTPS itself when given a certificate."""

    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain to serve HTTPS with (uvicorn's ssl_certfile); set "
        "with tls_key_file. Unset: plain HTTP (TLS ended by a proxy in front, or development).",
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file (uvicorn's ssl_keyfile)."
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        check_tls_pair(
            self.tls_cert_file, self.tls_key_file, str(self.model_config.get("env_prefix", ""))
        )
        return self
