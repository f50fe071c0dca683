"""Structured (JSON lines) logging for every service.

Log identifiers and hashes, never patient names or birth dates: pass extra fields with
``logger.info("stored", extra={"SOPInstanceUID": uid})`` and they appear as JSON keys.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, ValidationError

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message and the extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines tagged with ``service``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that chat at INFO about every connection.
    for noisy in ("kafka", "aiokafka", "pynetdicom", "httpx", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: Log levels a service's ``log_level`` setting accepts.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return level


#: The type of every service's ``log_level`` setting: one of :data:`LOG_LEVELS`, upper-cased.
LogLevel = Annotated[str, AfterValidator(_log_level)]


def log_invalid_settings(log: logging.Logger, error: ValidationError) -> None:
    """Log why a service's settings were refused: each setting and what is wrong with it,
    never the value given (it may be a secret, such as a database URL's password)."""
    log.error(
        "invalid settings", extra={"errors": error.errors(include_url=False, include_input=False)}
    )
