"""``scanwatch-worker`` / ``python -m inference_worker``: run the inference worker until
SIGTERM or SIGINT.

Configuration comes from ``SCANWATCH_WORKER_*`` environment variables (see
:class:`inference_worker.config.Settings`); the options here override them.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Collection
from typing import Any

import faust
from confluent_kafka import KafkaException
from pydantic import ValidationError

from inference_worker.app import create_app, table_topics
from inference_worker.config import Settings
from scanwatch import kafka
from scanwatch.logs import configure_logging

SERVICE = "inference-worker"
#: How long a starting worker retries making its changelog ready (a broker restarting, or slow
#: to answer on a loaded machine: its 30 s admin timeout was once missed at load 25, and the
#: worker's exit then failed a whole development stack's start), and how often.
CHANGELOG_WAIT_S, CHANGELOG_RETRY_S = 300.0, 2.0
ENV_PREFIX = "SCANWATCH_WORKER_"
log = logging.getLogger("inference_worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanwatch-worker",
        description="Faust worker: assembles MR studies from instance events, scores them "
        "through the TF Serving gRPC API and writes FHIR results. Settings come from "
        f"{ENV_PREFIX}* environment variables; options here override them.",
    )
    parser.add_argument("--web-host", help=f"interface of /healthz ({ENV_PREFIX}WEB_HOST)")
    parser.add_argument("--web-port", type=int, help=f"port of /healthz ({ENV_PREFIX}WEB_PORT)")
    parser.add_argument("--data-dir", help=f"Faust's data directory ({ENV_PREFIX}DATA_DIR)")
    return parser


def settings_errors(exc: ValidationError, options: Collection[str] = ()) -> list[str]:
    """One line per invalid setting, named by its option when it came from one of
    ``options``, else by its environment variable (values left out: some are secrets)."""
    lines = []
    for error in exc.errors(include_url=False):
        fields = [str(part) for part in error["loc"]]
        if not fields:
            name = "settings"
        elif fields[0] in options:
            name = "--" + fields[0].replace("_", "-")
        else:
            name = ENV_PREFIX + fields[0].upper()
        lines.append(f"{name}: {error['msg']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("web_host", args.web_host),
            ("web_port", args.web_port),
            ("data_dir", args.data_dir),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        configure_logging(SERVICE)
        for line in settings_errors(exc, overrides):
            log.error("invalid setting %s", line)
        return 2
    configure_logging(SERVICE, settings.log_level)
    logging.getLogger("faust.transport").setLevel(logging.WARNING)
    return run(settings)


def run(settings: Settings) -> int:
    """Run the worker until it stops; this exits the process (Faust's worker does)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    deadline = time.monotonic() + CHANGELOG_WAIT_S
    while True:
        try:
            kafka.ensure_topics(settings.kafka_bootstrap_servers, table_topics(app))
            break
        except (KafkaException, kafka.KafkaTopicError) as exc:
            if time.monotonic() >= deadline:  # its supervisor starts it again
                log.error("study table's changelog not ready", extra={"error": str(exc)})
                return 1
            log.warning("study table's changelog not ready yet", extra={"error": str(exc)})
            time.sleep(CHANGELOG_RETRY_S)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        override_logging=False,  # logging is scanwatch's, configured above
        quiet=True,
    )
    worker.execute_from_commandline()  # exits the process when the worker stops


if __name__ == "__main__":
    raise SystemExit(main())
