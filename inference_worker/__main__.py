"""``scanwatch-worker``: run the inference worker until SIGTERM/SIGINT."""

from __future__ import annotations

import faust

from inference_worker.app import create_app
from inference_worker.config import Settings


def logging_config(service: str, level: str) -> dict:
    """dictConfig that routes Faust's and our loggers through scanwatch's JSON formatter."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "scanwatch.logs.JsonFormatter", "service": service}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"level": "WARNING"} for name in ("aiokafka", "kafka", "faust.transport")
        },
    }


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config("inference-worker", settings.log_level),
        quiet=True,
    )
    worker.execute_from_commandline()  # exits the process when the worker stops
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
