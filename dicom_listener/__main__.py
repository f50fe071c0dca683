"""``scanwatch-listener`` / ``python -m dicom_listener``: serve until SIGTERM or SIGINT.

Configuration comes from ``SCANWATCH_LISTENER_*`` environment variables (see
:class:`dicom_listener.config.Settings`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from pydantic import ValidationError

from dicom_listener.app import create_app
from dicom_listener.config import Settings
from scanwatch.logs import configure_logging

SERVICE = "dicom-listener"
log = logging.getLogger("dicom_listener")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scanwatch-listener",
        description="DICOM Storage SCP for MR: stores instances, announces them on Kafka. "
        "Configured by SCANWATCH_LISTENER_* environment variables.",
    )
    parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        configure_logging(SERVICE)
        log.error("invalid settings: %s", exc)
        return 2
    configure_logging(SERVICE, settings.log_level)

    app = create_app(settings)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        try:
            app.start()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
            app.stop(grace_s=0)
            return 1
        stop.wait()
        log.info("stopping")
        app.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
