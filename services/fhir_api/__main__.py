"""``scanwatch-fhir-api``: serve the FHIR API with uvicorn (settings from SCANWATCH_FHIR_*),
or administer it: ``migrate``, ``register-client``, ``list-clients``, ``issue-token``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import timedelta

import uvicorn
from pydantic import ValidationError

from scanwatch.database import make_engine
from scanwatch.http_access import metrics_closed_warning, uvicorn_tls
from scanwatch.logs import configure_logging, log_invalid_settings
from services.auth import clients
from services.auth.config import AuthSettings
from services.auth.scopes import parse_scopes
from services.fhir_api import migrate
from services.fhir_api import workers as workers_module
from services.fhir_api.app import SERVICE, create_app, prepare_database, token_service
from services.fhir_api.config import Settings

log = logging.getLogger(__name__)
COMMANDS = ("serve", "migrate", "register-client", "list-clients", "issue-token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanwatch-fhir-api",
        description="FHIR R4 API over scanwatch's results store. Settings come from "
        "SCANWATCH_FHIR_* environment variables; options here override them.",
    )
    parser.add_argument("--host", help="interface to listen on (SCANWATCH_FHIR_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (SCANWATCH_FHIR_PORT)")
    parser.add_argument("--database-url", help="store URL (SCANWATCH_FHIR_DATABASE_URL)")
    parser.add_argument(
        "--workers", type=int, help="HTTP worker processes of serve (SCANWATCH_FHIR_WORKERS)"
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the API (the default)")
    commands.add_parser("migrate", help="upgrade the database schema to the latest revision")
    register = commands.add_parser(
        "register-client", help="register a client for the token endpoint; prints its secret"
    )
    register.add_argument("client_id")
    register.add_argument(
        "--scope", required=True, help="space-separated scopes, e.g. 'system/*.read'"
    )
    register.add_argument("--patient", help="Patient id that patient/ scopes are bound to")
    register.add_argument("--description")
    commands.add_parser("list-clients", help="list registered clients (no secrets)")
    issue = commands.add_parser(
        "issue-token", help="issue an access token directly (no client needed); prints it"
    )
    issue.add_argument("--subject", required=True, help="who the token is for (sub claim)")
    issue.add_argument("--scope", required=True)
    issue.add_argument("--patient", help="Patient id for patient/ scopes")
    issue.add_argument("--lifetime-s", type=int, default=900)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("database_url", args.database_url),
            ("workers", args.workers),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
        AuthSettings()  # the sign-in server's (SCANWATCH_AUTH_*): refused here, not per worker
    except ValidationError as exc:
        configure_logging(SERVICE)
        log_invalid_settings(log, exc)
        return 2
    configure_logging(SERVICE, settings.log_level)
    command = args.command or "serve"
    if command == "serve":
        return serve(settings, overrides)
    if command == "issue-token":
        try:
            scopes = parse_scopes(args.scope)
        except ValueError as exc:
            log.error("invalid scope", extra={"error": str(exc)})
            return 2
        if any(s.context == "patient" for s in scopes) and not args.patient:
            log.error("patient/ scopes need --patient")
            return 2
        try:
            tokens = token_service(settings)
        except ValueError as exc:
            log.error("cannot load the token signing keys", extra={"error": str(exc)})
            return 2
        token, _ttl = tokens.issue(
            args.subject, scopes, args.patient, timedelta(seconds=args.lifetime_s)
        )
        sys.stdout.write(token + "\n")
        return 0
    engine = make_engine(settings.database_url)
    try:
        migrate.upgrade(engine)
        if command == "register-client":
            try:
                secret = clients.register_client(
                    engine, args.client_id, args.scope, args.patient, args.description
                )
            except ValueError as exc:
                log.error("cannot register the client", extra={"error": str(exc)})
                return 2
            sys.stdout.write(
                json.dumps({"client_id": args.client_id, "client_secret": secret}) + "\n"
            )
        elif command == "list-clients":
            for client in clients.list_clients(engine):
                sys.stdout.write(
                    json.dumps(
                        {
                            "client_id": client.client_id,
                            "scopes": client.scopes,
                            "patient": client.patient,
                            "active": client.active,
                        }
                    )
                    + "\n"
                )
    finally:
        engine.dispose()
    return 0


def serve(settings: Settings, overrides: dict[str, object]) -> int:
    """Prepare the database once, then serve with ``settings.worker_count`` processes; the
    exit status."""
    if settings.auth_mode == "required":
        # Once, before the workers start: the key set is created here, and an unsafe one is
        # refused with one message instead of a traceback per worker.
        try:
            token_service(settings)
        except ValueError as exc:
            log.error("cannot load the token signing keys", extra={"error": str(exc)})
            return 2
    engine = make_engine(settings.database_url)
    try:
        prepare_database(engine, settings)
    finally:
        engine.dispose()
    workers = settings.worker_count
    metrics_closed_warning(settings.host, settings.metrics_secret, "SCANWATCH_FHIR_METRICS_TOKEN")
    log.info("starting", extra={"host": settings.host, "port": settings.port, "workers": workers})
    common: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # keep scanwatch's JSON logging
        "access_log": False,  # request paths carry patient ids; metrics count requests instead
        **uvicorn_tls(settings.tls_cert_file, settings.tls_key_file),
    }
    if workers == 1:
        uvicorn.run(create_app(settings, database_prepared=True), **common)  # type: ignore[arg-type]
        return 0
    # Each worker is a fresh process that reads its settings from the environment (it builds
    # its app from an import string): hand it this command line's overrides there.
    for name, value in overrides.items():
        os.environ[f"SCANWATCH_FHIR_{name.upper()}"] = str(value)
    return 0 if workers_module.supervise(settings.host, settings.port, workers, common) else 1


if __name__ == "__main__":
    raise SystemExit(main())
