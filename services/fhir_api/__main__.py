"""``scanwatch-fhir-api``: serve the FHIR API with uvicorn (settings from SCANWATCH_FHIR_*)."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from pydantic import ValidationError

from scanwatch.logs import configure_logging
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

SERVICE = "fhir-api"
log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scanwatch-fhir-api",
        description="FHIR R4 API over scanwatch's results store. Settings come from "
        "SCANWATCH_FHIR_* environment variables; options here override them.",
    )
    parser.add_argument("--host", help="interface to listen on (SCANWATCH_FHIR_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (SCANWATCH_FHIR_PORT)")
    parser.add_argument("--database-url", help="store URL (SCANWATCH_FHIR_DATABASE_URL)")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("database_url", args.database_url),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        configure_logging(SERVICE)
        log.error("invalid settings", extra={"errors": exc.errors(include_url=False)})
        return 2
    configure_logging(SERVICE, settings.log_level)
    log.info("starting", extra={"host": settings.host, "port": settings.port})
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep scanwatch's JSON logging
        access_log=False,  # request paths carry patient ids; metrics count requests instead
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
