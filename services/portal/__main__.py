"""``scanwatch-portal``: serve the patient portal with uvicorn (settings from
``SCANWATCH_PORTAL_*``; options here override them)."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from pydantic import ValidationError

from scanwatch.http_access import metrics_closed_warning, uvicorn_tls
from scanwatch.logs import configure_logging, log_invalid_settings
from services.portal.app import SERVICE, create_app
from services.portal.config import Settings

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanwatch-portal",
        description="The patient portal (a SMART app on the FHIR API). Settings come from "
        "SCANWATCH_PORTAL_* environment variables; options here override them.",
    )
    parser.add_argument("--host", help="interface to listen on (SCANWATCH_PORTAL_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (SCANWATCH_PORTAL_PORT)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        configure_logging(SERVICE)
        log_invalid_settings(log, exc)
        return 2
    configure_logging(SERVICE, settings.log_level)
    metrics_closed_warning(settings.host, settings.metrics_secret, "SCANWATCH_PORTAL_METRICS_TOKEN")
    if not (settings.assets_dir / "chart.js").is_dir():
        log.warning(
            "front-end packages missing: the progress chart will not draw; run npm ci in "
            "services/portal (scripts/bootstrap.sh does)",
            extra={"assets_dir": str(settings.assets_dir)},
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep scanwatch's JSON logging
        **uvicorn_tls(settings.tls_cert_file, settings.tls_key_file),  # type: ignore[arg-type]
        access_log=False,  # paths carry result ids
        # An open results page holds an event stream that never ends by itself: on shutdown,
        # close it after a moment instead of waiting for the patient to close the tab.
        timeout_graceful_shutdown=3,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
