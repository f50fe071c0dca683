"""``scanwatch``: run the development stack, send the sample study, manage the local broker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from devtools.kafka_local import LocalKafka
from devtools.stack import Stack, StackConfig, StackError
from scanwatch import ids, kafka
from scanwatch.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent


def _var(value: str | None) -> Path:
    return Path(value or os.environ.get("SCANWATCH_VAR") or ROOT / "var").resolve()


def cmd_run(args: argparse.Namespace) -> int:
    config = StackConfig(var=_var(args.var), quiet_period_s=args.quiet_period)
    stack = Stack(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start()
    except StackError as exc:
        logging.getLogger("scanwatch").error("start failed: %s", exc)
        stack.stop()
        return 1
    sys.stdout.write(stack.banner() + "\n")
    sys.stdout.flush()
    stop.wait()
    stack.stop()
    return 0


def cmd_send_sample(args: argparse.Namespace) -> int:
    from devtools.peers import storescu
    from scanwatch.sample import build_mr_study

    folder = _var(args.var) / "samples" / args.patient_id
    files = sorted(folder.glob("*.dcm")) or build_mr_study(
        folder, patient_id=args.patient_id, n_slices=args.slices
    )
    storescu(files, args.host, args.port, called_ae=args.ae_title)
    patient = ids.patient_id(None, args.patient_id)
    fhir = args.fhir_base.rstrip("/")
    sys.stdout.write(
        f"sent {len(files)} MR images of patient {args.patient_id} to "
        f"{args.ae_title}@{args.host}:{args.port}\n"
        f"FHIR Patient id: {patient}\n"
        f"after the quiet period and scoring:\n"
        f"  curl -s '{fhir}/Observation?patient={patient}'\n"
    )
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    var = _var(args.var)
    broker = LocalKafka(var / "kafka" / "broker", var / "kafka" / "libs", port=args.port)
    if args.action == "start":
        broker.start()
        sys.stdout.write(f"kafka running at {broker.bootstrap_servers}\n")
    elif args.action == "stop":
        broker.stop()
    else:
        running = broker.pid() is not None
        sys.stdout.write(f"kafka {'running' if running else 'stopped'}\n")
        return 0 if running else 3
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    return kafka.main(["--bootstrap-servers", args.bootstrap_servers])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scanwatch", description=__doc__)
    p.add_argument("--var", help="state folder (default: $SCANWATCH_VAR or ./var)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole system until Ctrl-C")
    run.add_argument("--quiet-period", type=float, default=5.0, help="seconds (default 5)")
    run.set_defaults(func=cmd_run)

    send = sub.add_parser("send-sample", help="send the bundled sample MR study with storescu")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=11112)
    send.add_argument("--ae-title", default="SCANWATCH")
    send.add_argument("--patient-id", default="SW-DEMO-0001")
    send.add_argument("--slices", type=int, default=38)
    send.add_argument("--fhir-base", default="http://127.0.0.1:8080/fhir")
    send.set_defaults(func=cmd_send_sample)

    kafka = sub.add_parser("kafka", help="start, stop or check the local Kafka broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--port", type=int, default=9092)
    kafka.set_defaults(func=cmd_kafka)

    topics = sub.add_parser("topics", help="create scanwatch's topics on an existing cluster")
    topics.add_argument("--bootstrap-servers", required=True, help="host:port[,host:port]")
    topics.set_defaults(func=cmd_topics)
    return p


def main(argv: list[str] | None = None) -> int:
    configure_logging("scanwatch", os.environ.get("SCANWATCH_LOG_LEVEL", "INFO"))
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
