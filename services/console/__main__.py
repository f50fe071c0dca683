"""``scanwatch-console``: serve the console (today its DICOMweb service) with uvicorn
(settings from ``SCANWATCH_CONSOLE_*``; options here override them)."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from pydantic import ValidationError

from scanwatch.http_access import metrics_closed_warning, uvicorn_tls
from scanwatch.logs import configure_logging, log_invalid_settings
from services.console.app import SERVICE, create_app
from services.console.config import Settings

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanwatch-console",
        description="The staff console: DICOMweb (QIDO-RS, WADO-RS) over the file store. "
        "Settings come from SCANWATCH_CONSOLE_* environment variables; options here override "
        "them.",
    )
    parser.add_argument("--host", help="interface to listen on (SCANWATCH_CONSOLE_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (SCANWATCH_CONSOLE_PORT)")
    parser.add_argument(
        "--storage-dir", help="the listener's file store (SCANWATCH_CONSOLE_STORAGE_DIR)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("storage_dir", args.storage_dir))
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        configure_logging(SERVICE)
        log_invalid_settings(log, exc)
        return 2
    configure_logging(SERVICE, settings.log_level)
    metrics_closed_warning(
        settings.host, settings.metrics_secret, "SCANWATCH_CONSOLE_METRICS_TOKEN"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep scanwatch's JSON logging
        **uvicorn_tls(settings.tls_cert_file, settings.tls_key_file),  # type: ignore[arg-type]
        access_log=False,  # paths carry study UIDs
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
