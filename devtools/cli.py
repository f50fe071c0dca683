"""``scanwatch``: run the development stack, send the sample study, invite patients, register
SMART apps, manage the local broker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from devtools.kafka_local import LocalKafka, LocalKafkaCluster
from devtools.stack import Ports, Stack, StackConfig, StackError, dev_tokens
from scanwatch import care_plan, ids, kafka
from scanwatch.database import make_engine
from scanwatch.logs import configure_logging
from services.auth import accounts, clients
from services.auth.config import AuthSettings
from services.auth.scopes import parse_scopes

ROOT = Path(__file__).resolve().parent.parent


def _var(value: str | None) -> Path:
    return Path(value or os.environ.get("SCANWATCH_VAR") or ROOT / "var").resolve()


#: Scopes of the patient tokens ``scanwatch chat`` and ``scanwatch token --patient`` issue:
#: what the patient portal's tokens will carry.
PATIENT_SCOPES = "patient/*.read patient/CommunicationRequest.write"
#: ``scanwatch token``'s default scopes (without ``--patient``): a backend that reads.
SYSTEM_SCOPES = "system/*.read"


def dev_token(var: Path, scopes: str, patient_id: str | None = None) -> str:
    """A token for ``scopes``; bound to the Patient of ``patient_id`` (a DICOM PatientID, as
    ``send-sample`` names it) when given."""
    patient = ids.patient_id(None, patient_id) if patient_id else None
    return dev_tokens(var).issue("scanwatch-dev", parse_scopes(scopes), patient)[0]


def dev_engine(var: Path) -> Engine:
    """The development stack's FHIR store (``SCANWATCH_FHIR_DATABASE_URL``, else
    ``var/fhir.db``, where ``scanwatch run`` keeps it), migrated to the current schema (a no-op
    when the API already did it), which holds the accounts and the registered clients."""
    from services.fhir_api import migrate

    url = os.environ.get("SCANWATCH_FHIR_DATABASE_URL") or f"sqlite:///{var / 'fhir.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    return engine


def auth_base_url() -> str:
    """Where patients open activation links: ``SCANWATCH_AUTH_ISSUER``, else the dev stack's
    API on loopback."""
    return AuthSettings().issuer or f"http://127.0.0.1:{Ports().fhir}"


def invite_link(
    var: Path, patient_id: str, issuer: str | None = None, hours: float | None = None
) -> str:
    """A one-time activation link for the Patient of (``issuer``, ``patient_id``) (DICOM
    IssuerOfPatientID, PatientID), valid ``hours`` (default ``SCANWATCH_AUTH_INVITE_LIFETIME_S``,
    72 h)."""
    lifetime = (
        timedelta(hours=hours)
        if hours is not None
        else timedelta(seconds=AuthSettings().invite_lifetime_s)
    )
    engine = dev_engine(var)
    try:
        patient = ids.patient_id(issuer, patient_id)
        return accounts.invite_link(engine, patient, auth_base_url(), lifetime)
    finally:
        engine.dispose()


def cmd_patients_invite(args: argparse.Namespace) -> int:
    link = invite_link(_var(args.var), args.patient_id, args.issuer, args.expires_hours)
    sys.stdout.write(
        f"activation link for patient {args.patient_id} (works once; give it to the patient "
        f"only):\n{link}\n"
    )
    return 0


def cmd_staff_create(args: argparse.Namespace) -> int:
    lifetime = (
        timedelta(hours=args.expires_hours)
        if args.expires_hours is not None
        else timedelta(seconds=AuthSettings().invite_lifetime_s)
    )
    engine = dev_engine(_var(args.var))
    try:
        link = accounts.staff_invite_link(
            engine, args.username, args.role, auth_base_url(), lifetime
        )
    except ValueError as exc:  # a malformed or taken username, an unknown role
        sys.stderr.write(f"staff create: {exc}\n")
        return 2
    finally:
        engine.dispose()
    sys.stdout.write(
        f"staff account {args.username} ({args.role}) created; activation link (works once; "
        f"give it to that person only):\n{link}\n"
    )
    return 0


def cmd_clients_register_app(args: argparse.Namespace) -> int:
    engine = dev_engine(_var(args.var))
    try:
        secret = clients.register_app(
            engine,
            args.client_id,
            args.redirect_uri,
            args.scope,
            confidential=args.confidential,
            description=args.description,
        )
    except ValueError as exc:
        sys.stderr.write(f"register-app: {exc}\n")
        return 2
    finally:
        engine.dispose()
    answer = {"client_id": args.client_id, "redirect_uris": args.redirect_uri}
    if secret:
        answer["client_secret"] = secret
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


def cmd_clients_register_staff_app(args: argparse.Namespace) -> int:
    engine = dev_engine(_var(args.var))
    try:
        secret = clients.register_staff_app(
            engine, args.client_id, args.redirect_uri, description=args.description
        )
    except ValueError as exc:
        sys.stderr.write(f"register-staff-app: {exc}\n")
        return 2
    finally:
        engine.dispose()
    answer = {
        "client_id": args.client_id,
        "redirect_uris": args.redirect_uri,
        "client_secret": secret,
    }
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = StackConfig(
        var=_var(args.var), quiet_period_s=args.quiet_period, chatbot=not args.no_chatbot
    )
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
    )
    if args.care_plan:
        _write_sample_care_plan(_var(args.var), fhir, patient)
        sys.stdout.write("wrote the sample's prescription and follow-up visit (test data)\n")
    try:
        link = invite_link(_var(args.var), args.patient_id)
    except Exception as exc:  # noqa: BLE001 - the study is sent; the invite is a convenience
        sys.stdout.write(f"no patient portal invite: {exc}\n")
    else:
        sys.stdout.write(f"patient portal activation link (works once):\n  {link}\n")
    sys.stdout.write(
        "after the quiet period and scoring:\n"
        f'  curl -s -H "Authorization: Bearer $(.venv/bin/scanwatch token)" '
        f"'{fhir}/Observation?patient={patient}'\n"
        f"  .venv/bin/scanwatch chat --patient {args.patient_id}\n"
    )
    return 0


def _write_sample_care_plan(var: Path, fhir: str, patient: str) -> None:
    """PUT the dev seed's MedicationRequest and Appointment (``scanwatch.care_plan``) with a
    system token: the clinician console will write these; until then the seed does."""
    now = datetime.now(UTC)
    token = dev_token(var, "system/*.write")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    for resource in care_plan.sample_care_plan(patient, prescribed=now, today=now.date()):
        url = f"{fhir}/{resource['resourceType']}/{resource['id']}"
        httpx.put(url, json=resource, headers=headers, timeout=30).raise_for_status()


def cmd_token(args: argparse.Namespace) -> int:
    scopes = args.scope or (PATIENT_SCOPES if args.patient else SYSTEM_SCOPES)
    sys.stdout.write(dev_token(_var(args.var), scopes, args.patient) + "\n")
    return 0


def _send(var: Path, url: str, patient_id: str, text: str) -> httpx.Response:
    """POST one message as the patient; when the channel says "too many messages" (429), wait
    as long as its Retry-After says and send it once more, as a patient's app would."""

    def post() -> httpx.Response:
        token = dev_token(var, PATIENT_SCOPES, patient_id)  # fresh: tokens live 15 minutes
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.post(url, json={"message": text}, headers=headers, timeout=60)

    answer = post()
    if answer.status_code == 429:
        time.sleep(float(answer.headers.get("Retry-After", "2")))
        answer = post()
    return answer


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal client of the patient channel, as the patient of ``--patient``: each line
    typed is a message; a number picks one of the buttons the bot offered."""
    var = _var(args.var)
    echo = not sys.stdin.isatty()  # piped input: show it, so the output reads as a transcript
    buttons: list[dict[str, str]] = []
    sys.stdout.write(f"chatting as patient {args.patient} (Ctrl-D ends)\n")
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        if echo:
            sys.stdout.write(f"you> {text}\n")
        if text.isdigit() and 1 <= int(text) <= len(buttons):
            text = buttons[int(text) - 1]["payload"]
        try:
            answer = _send(var, args.url, args.patient, text)
        except httpx.HTTPError as exc:
            sys.stderr.write(f"chat: cannot reach {args.url}: {exc}\n")
            return 1
        if answer.status_code != 200:
            sys.stdout.write(f"bot! HTTP {answer.status_code}: {answer.text}\n")
            continue
        buttons = []
        for message in answer.json():
            if message.get("text"):
                for reply in message["text"].splitlines():
                    sys.stdout.write(f"bot> {reply}\n")
            for button in message.get("buttons") or []:
                buttons.append(button)
                sys.stdout.write(f"     [{len(buttons)}] {button['title']}\n")
        sys.stdout.flush()
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    var = _var(args.var)
    if args.nodes != 1:
        return _kafka_cluster(args, var)
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


def _kafka_cluster(args: argparse.Namespace, var: Path) -> int:
    """``scanwatch kafka … --nodes 3``: production's shape on loopback (node n on port
    ``--port`` + 2(n - 1), its controller on the port above), state in var/kafka/cluster."""
    try:
        cluster = LocalKafkaCluster(
            var / "kafka" / "cluster",
            var / "kafka" / "libs",
            ports=[args.port + 2 * n for n in range(args.nodes)],
            nodes=args.nodes,
        )
    except ValueError as exc:
        sys.stderr.write(f"kafka: {exc}\n")
        return 2
    if args.action == "start":
        cluster.start()
        sys.stdout.write(
            f"kafka cluster of {args.nodes} nodes running at {cluster.bootstrap_servers}\n"
        )
    elif args.action == "stop":
        cluster.stop()
    else:
        running = [n for n in cluster.nodes if cluster.pid(n) is not None]
        sys.stdout.write(f"kafka nodes running: {len(running)} of {args.nodes} {running}\n")
        return 0 if len(running) == args.nodes else 3
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    return kafka.main(["--bootstrap-servers", args.bootstrap_servers])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scanwatch", description=__doc__)
    p.add_argument("--var", help="state folder (default: $SCANWATCH_VAR or ./var)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole system until Ctrl-C")
    run.add_argument("--quiet-period", type=float, default=5.0, help="seconds (default 5)")
    run.add_argument(
        "--no-chatbot",
        action="store_true",
        help="leave out the patient chatbot (Rasa), the portal, the console and the training "
        "worker; the FHIR API still requires tokens",
    )
    run.set_defaults(func=cmd_run)

    send = sub.add_parser("send-sample", help="send the bundled sample MR study with storescu")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=11112)
    send.add_argument("--ae-title", default="SCANWATCH")
    send.add_argument("--patient-id", default="SW-DEMO-0001")
    send.add_argument("--slices", type=int, default=38)
    send.add_argument("--fhir-base", default="http://127.0.0.1:8080/fhir")
    send.add_argument(
        "--no-care-plan",
        dest="care_plan",
        action="store_false",
        help="do not write the sample's prescription and follow-up visit to the FHIR API",
    )
    send.set_defaults(func=cmd_send_sample)

    token = sub.add_parser(
        "token", help="print an access token the development stack's FHIR API accepts"
    )
    token.add_argument("--patient", help="bind it to this PatientID's Patient (patient scopes)")
    token.add_argument("--scope", help=f"space-separated scopes (default {SYSTEM_SCOPES!r})")
    token.set_defaults(func=cmd_token)

    chat = sub.add_parser("chat", help="talk to the patient chatbot as one patient")
    chat.add_argument("--patient", required=True, help="the PatientID (as sent over DICOM)")
    chat.add_argument("--url", default=StackConfig(var=ROOT).chat_url, help="the chat endpoint")
    chat.set_defaults(func=cmd_chat)

    patients = sub.add_parser("patients", help="patient accounts of the patient portal")
    patients_sub = patients.add_subparsers(dest="action", required=True)
    invite = patients_sub.add_parser(
        "invite", help="print a one-time activation link for a patient's account"
    )
    invite.add_argument("patient_id", help="the PatientID (as sent over DICOM)")
    invite.add_argument("--issuer", help="the IssuerOfPatientID, when the PatientID has one")
    invite.add_argument("--expires-hours", type=float, help="how long the link works (default 72)")
    invite.set_defaults(func=cmd_patients_invite)

    staff = sub.add_parser("staff", help="staff accounts of the console")
    staff_sub = staff.add_subparsers(dest="action", required=True)
    create = staff_sub.add_parser(
        "create", help="create a staff account and print its one-time activation link"
    )
    create.add_argument("username", help="3-64 characters: letters, digits, '.', '_', '-', '@'")
    create.add_argument("--role", required=True, choices=accounts.STAFF_ROLES)
    create.add_argument("--expires-hours", type=float, help="how long the link works (default 72)")
    create.set_defaults(func=cmd_staff_create)

    clients_parser = sub.add_parser("clients", help="OAuth clients of the authorization server")
    clients_sub = clients_parser.add_subparsers(dest="action", required=True)
    app = clients_sub.add_parser(
        "register-app", help="register a SMART app that signs patients in (the portal)"
    )
    app.add_argument("client_id")
    app.add_argument(
        "--redirect-uri",
        action="append",
        required=True,
        help="where codes are sent back (exact match; repeat for several)",
    )
    app.add_argument("--scope", default=clients.SMART_APP_SCOPES, help="scopes it may be granted")
    app.add_argument(
        "--confidential",
        action="store_true",
        help="give it a secret (printed once); default: a public app (PKCE only)",
    )
    app.add_argument("--description", help="the name patients see on the sign-in page")
    app.set_defaults(func=cmd_clients_register_app)
    staff_app = clients_sub.add_parser(
        "register-staff-app",
        help="register an app that signs staff in (the console): confidential, its secret "
        "printed once",
    )
    staff_app.add_argument("client_id")
    staff_app.add_argument(
        "--redirect-uri",
        action="append",
        required=True,
        help="where codes are sent back (<console URL>/callback; repeat for several)",
    )
    staff_app.add_argument("--description", help="the name staff see on the sign-in page")
    staff_app.set_defaults(func=cmd_clients_register_staff_app)

    kafka = sub.add_parser("kafka", help="start, stop or check the local Kafka broker")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--port", type=int, default=9092)
    kafka.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="1: the development broker (default); 3: production's shape, three KRaft nodes "
        "(ports --port, +2, +4), topics with three copies and min.insync.replicas 2",
    )
    kafka.set_defaults(func=cmd_kafka)

    topics = sub.add_parser("topics", help="create scanwatch's topics on an existing cluster")
    topics.add_argument("--bootstrap-servers", required=True, help="host:port[,host:port]")
    topics.set_defaults(func=cmd_topics)
    return p


def main(argv: list[str] | None = None) -> int:
    configure_logging("scanwatch", os.environ.get("SCANWATCH_LOG_LEVEL", "INFO"))
    # A command that opens the development database (send-sample's invite, patients, clients)
    # brings it up to date first; Alembic's own lines about that are noise at a terminal.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
