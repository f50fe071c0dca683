"""``python -m services.model_server`` / ``scanwatch-model-server``: serve until SIGTERM/SIGINT.

Settings come from ``SCANWATCH_MODEL_SERVER_*``; the flags below override them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scanwatch.logs import configure_logging, log_invalid_settings

logger = logging.getLogger(__name__)

SERVICE = "model_server"


def _parse(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="scanwatch-model-server",
        description="Serve a TF-Serving-layout model repository over the TF Serving gRPC API.",
    )
    parser.add_argument("--model-base-path", type=Path, help="repository root (<base>/<name>/<v>/)")
    parser.add_argument("--model-name", help="served model name")
    parser.add_argument("--host", help="listen interface")
    parser.add_argument("--port", type=int, help="gRPC port")
    parser.add_argument("--poll-interval-s", type=float, help="repository polling interval")
    parser.add_argument(
        "--model-config-file", type=Path, help="TF Serving model config (model_config_list)"
    )
    parser.add_argument("--engine", choices=("tensorflow", "openvino"), help="inference engine")
    parser.add_argument(
        "--enable-batching",
        action="store_const",
        const=True,
        help="merge concurrent Predict calls (server-side batching)",
    )
    parser.add_argument(
        "--batching-parameters-file", type=Path, help="TF Serving batching parameters file"
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    overrides = _parse(argv)
    from services.model_server.config import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        configure_logging(SERVICE)
        log_invalid_settings(logger, error)
        return 2
    configure_logging(SERVICE, settings.log_level)
    # Imported once the settings are valid: --help and bad settings do not wait for TensorFlow.
    from services.model_server.app import create_server

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = create_server(settings)
    try:
        server.start()
    except OSError:
        logger.exception("cannot start the model server")
        return 1
    while not stop.wait(1.0):
        pass
    logger.info("stopping on signal")
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
