"""The whole system on one machine, on embedded defaults: the development stack.

Starts a local Kafka, the model server, the FHIR API, the inference worker and the DICOM
listener as child processes, waits until each answers its health check, restarts any that dies,
the broker included (the worker exits on purpose on fatal errors, so that a supervisor restarts
it), and stops everything on SIGINT/SIGTERM. ``scanwatch run`` and the end-to-end tests both use it.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx

from devtools.kafka_local import LocalKafka
from devtools.peers import echoscu
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from schemas.topics import DEVELOPMENT, PRODUCTION
from services.auth.scopes import parse_scopes
from services.auth.tokens import TokenService, load_key_set

#: training.worker.GROUP_ID, written out: importing the worker would load TensorFlow into the
#: stack's supervisor (tests/unit/test_stack_training.py checks the two agree).
TRAINING_GROUP = "scanwatch-training"

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CHATBOT = ROOT / "chatbot"
RASA = ROOT / ".venv-rasa" / "bin" / "rasa"
#: The client the worker writes results with (the FHIR API always requires tokens).
WORKER_CLIENT = "scanwatch-worker"
#: Scopes and lifetime of the development token the banner prints (a backend that reads).
BANNER_SCOPES = "system/*.read"
BANNER_TOKEN_LIFETIME = timedelta(hours=12)
#: The patient portal's client id (a confidential SMART app; its secret is made per run).
PORTAL_CLIENT = "scanwatch-portal"
#: The staff console's client id (a confidential staff app; its secret is made per run).
CONSOLE_CLIENT = "scanwatch-console"
#: The development staff login the stack creates (a clinician; its password is made per run).
DEV_STAFF_USERNAME = "dev.clinician"
#: The development operator (same password as the clinician): the console's operator pages.
DEV_OPERATOR_USERNAME = "dev.operator"


@dataclass
class Ports:
    """Where each service listens on loopback."""

    kafka: int = 9092
    kafka_controller: int = 9093
    dicom: int = 11112
    fhir: int = 8080
    model_server: int = 8500
    model_server_metrics: int = 9112
    worker_web: int = 6066  # first worker; further workers use the next ports
    listener_metrics: int = 9111
    listener_publisher_metrics: int = 9113  # the listener's outbox publisher process
    chat: int = 5005  # Rasa server: the patient channel and Rasa's HTTP API
    chat_actions: int = 5055  # Rasa's action server
    portal: int = 8090  # the patient portal
    console: int = 8100  # the staff console: its pages and DICOMweb over the file store


@dataclass
class StackConfig:
    """What the stack runs with. ``var`` holds every piece of state (Kafka log, file store,
    FHIR database, model repository, service logs)."""

    var: Path
    ports: Ports = field(default_factory=Ports)
    ae_title: str = "SCANWATCH"
    quiet_period_s: float = 5.0
    workers: int = 1  # inference worker processes (worker n's web port: worker_web + n - 1)
    model_name: str = DEFAULT_MODEL_NAME
    model_engine: str = "tensorflow"  # or "openvino": the model server's engine
    models: Path | None = None  # model repository; default var/models
    kafka_libs: Path | None = None  # default var/kafka/libs
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Run the patient chatbot (Rasa server and action server), the portal, the console and
    #: the training worker. The FHIR API requires tokens either way (the worker writes with a
    #: client of its own, made per run; the bot reads with the patient's token).
    chatbot: bool = False
    chat_models: Path | None = None  # trained chatbot models; default var/chatbot/models
    #: Rasa's HTTP API token (``--auth-token``); the stack makes one when it is None.
    chat_api_token: str | None = None
    #: Only these services (names of :meth:`Stack.services`); None: all. Kafka starts only
    #: when a service that needs it is among them.
    only: tuple[str, ...] | None = None
    #: An existing Kafka cluster (``host:port,…``, its topics created) that the services use
    #: instead of the stack's own single broker, which is then neither started nor supervised:
    #: the broker-loss test's three-node ``LocalKafkaCluster``. The workers' own topics (the
    #: table's changelog) get production's replication factor there.
    kafka_bootstrap_servers: str | None = None
    #: The FHIR API's database (``SCANWATCH_FHIR_DATABASE_URL``); None: SQLite in var/fhir.db.
    #: The fault suite runs it on a real PostgreSQL to stop the database under traffic.
    fhir_database_url: str | None = None
    #: Where clients reach the broker, and the network namespace it runs in (None: this one).
    #: The fault suite puts it behind a veth pair to cut the network between it and the rest.
    kafka_host: str = "127.0.0.1"
    kafka_netns: str | None = None
    #: Niceness of the services that score (the model server, the inference workers, the
    #: training worker), so that the listener, the broker and the FHIR API win contended cores
    #: (at 10, Linux weighs them 1024 : 110). 0 (equal) by default: measured at 10, ingest while
    #: the stack scores rose about 6 % and a result sent just before a burst came 0.2 s later
    #: (bench/README.md, "Ingest while the whole system runs"); the benches set it.
    scoring_nice: int = 0

    @property
    def model_repository(self) -> Path:
        return self.models or self.var / "models"

    @property
    def signing_keys_file(self) -> Path:
        """The FHIR API's token signing key set (a JWK Set of private keys, mode 0600)."""
        return self.var / "auth" / "signing-keys.json"

    @property
    def fhir_database(self) -> str:
        """The FHIR API's database URL: :attr:`fhir_database_url`, else SQLite in var."""
        return self.fhir_database_url or f"sqlite:///{self.var / 'fhir.db'}"

    @property
    def fhir_base(self) -> str:
        return f"http://127.0.0.1:{self.ports.fhir}/fhir"

    @property
    def chat_url(self) -> str:
        """Where a patient's messages go (with the patient's bearer token)."""
        return f"http://127.0.0.1:{self.ports.chat}/webhooks/patient/webhook"

    @property
    def portal_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.portal}"

    @property
    def chat_model_dir(self) -> Path:
        return self.chat_models or self.var / "chatbot" / "models"


@dataclass
class Service:
    """One child process of the stack and how to tell it is healthy."""

    name: str
    argv: list[str]
    env: dict[str, str]
    healthy: Callable[[], bool]
    kafka: bool = False  # needs the broker
    cwd: Path = ROOT
    process: subprocess.Popen | None = None
    restarts: int = 0
    held: bool = False  # stopped on purpose: the supervisor leaves it down
    nice: int = 0  # its niceness (StackConfig.scoring_nice for the scoring services)


class StackError(RuntimeError):
    """A service did not become healthy."""


class Stack:
    """Runs and supervises the services of :class:`StackConfig`."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.logs = config.var / "logs"
        self.kafka = LocalKafka(
            config.var / "kafka" / "broker",
            config.kafka_libs or config.var / "kafka" / "libs",
            port=config.ports.kafka,
            controller_port=config.ports.kafka_controller,
            host=config.kafka_host,
            netns=config.kafka_netns,
        )
        self.worker_secret = secrets.token_urlsafe(24)
        self.chat_api_token = config.chat_api_token or secrets.token_urlsafe(24)
        self.portal_secret = secrets.token_urlsafe(32)
        self.console_secret = secrets.token_urlsafe(32)
        self.staff_password = secrets.token_urlsafe(12)
        self.services = [
            s for s in self._services() if config.only is None or s.name in config.only
        ]
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        #: True while the broker is stopped on purpose (an outage the supervisor leaves alone).
        self.kafka_held = False

    def _services(self) -> list[Service]:
        c, p = self.config, self.config.ports
        py = sys.executable
        base = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's C++ start-up chatter is not our log
            "PYTHONUNBUFFERED": "1",
            **c.extra_env,
        }
        kafka = self.bootstrap_servers
        return [
            Service(
                "model-server",
                [py, "-m", "services.model_server"],
                {
                    **base,
                    "SCANWATCH_MODEL_SERVER_MODEL_BASE_PATH": str(c.model_repository),
                    "SCANWATCH_MODEL_SERVER_MODEL_NAME": c.model_name,
                    "SCANWATCH_MODEL_SERVER_PORT": str(p.model_server),
                    "SCANWATCH_MODEL_SERVER_METRICS_PORT": str(p.model_server_metrics),
                    "SCANWATCH_MODEL_SERVER_ENGINE": c.model_engine,
                    "SCANWATCH_MODEL_SERVER_OPENVINO_CACHE_DIR": str(c.var / "cache" / "openvino"),
                },
                lambda: model_available(f"127.0.0.1:{p.model_server}", c.model_name),
                nice=c.scoring_nice,
            ),
            Service(
                "fhir-api",
                [py, "-m", "services.fhir_api"],
                {
                    **base,
                    "SCANWATCH_FHIR_DATABASE_URL": c.fhir_database,
                    "SCANWATCH_FHIR_PORT": str(p.fhir),
                    # The token signing keys (created on first start with tokens required);
                    # their public half: http://127.0.0.1:<fhir>/auth/jwks.
                    "SCANWATCH_FHIR_SIGNING_KEYS_FILE": str(c.signing_keys_file),
                    **self._fhir_auth(),
                },
                lambda: _http_ok(f"http://127.0.0.1:{p.fhir}/healthz"),
            ),
            *(self._worker(n, base) for n in range(1, c.workers + 1)),
            Service(
                "dicom-listener",
                [py, "-m", "dicom_listener"],
                {
                    **base,
                    "SCANWATCH_LISTENER_AE_TITLE": c.ae_title,
                    "SCANWATCH_LISTENER_PORT": str(p.dicom),
                    "SCANWATCH_LISTENER_STORAGE_DIR": str(c.var / "store"),
                    "SCANWATCH_LISTENER_KAFKA_BOOTSTRAP_SERVERS": kafka,
                    "SCANWATCH_LISTENER_METRICS_PORT": str(p.listener_metrics),
                    "SCANWATCH_LISTENER_PUBLISHER_METRICS_PORT": str(p.listener_publisher_metrics),
                },
                lambda: echoscu("127.0.0.1", p.dicom, c.ae_title, timeout=3.0),
                kafka=True,
            ),
            *(self._chatbot(base) if c.chatbot else []),
            *([self._portal(base), self._console(base)] if c.chatbot else []),
            *([self._training_worker(base)] if c.chatbot else []),
        ]

    def _training_worker(self, base: dict[str, str]) -> Service:
        """Training jobs and promotions asked for over Kafka (the console's operator pages):
        it trains into the repository the model server watches, so a promoted version is
        served without a restart. Healthy once its consumer group has joined."""
        c = self.config
        kafka = self.bootstrap_servers
        return Service(
            "training-worker",
            [sys.executable, "-m", "training", "worker"],
            {
                **base,
                "SCANWATCH_TRAIN_REPOSITORY": str(c.model_repository),
                "SCANWATCH_TRAIN_RUNS_DIR": str(c.var / "training" / "runs"),
                "SCANWATCH_TRAIN_CACHE_DIR": str(c.var / "training" / "cache"),
                "SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS": kafka,
            },
            lambda: _group_joined(kafka, TRAINING_GROUP),
            nice=c.scoring_nice,
            kafka=True,
        )

    def _fhir_auth(self) -> dict[str, str]:
        """The FHIR API requires tokens and registers the worker's client (this run's secret);
        with the web apps, where their sign-in pages send people back to."""
        scopes = "system/*.write system/*.read"
        required = {
            "SCANWATCH_FHIR_AUTH_MODE": "required",
            "SCANWATCH_FHIR_BOOTSTRAP_CLIENTS": f"{WORKER_CLIENT}:{self.worker_secret}:{scopes}",
        }
        if not self.config.chatbot:
            return required
        return {
            **required,
            # The activation page links here once a patient has set a password.
            "SCANWATCH_AUTH_PORTAL_URL": self.config.portal_url,
            "SCANWATCH_AUTH_CONSOLE_URL": f"http://127.0.0.1:{self.config.ports.console}",
        }

    def _portal(self, base: dict[str, str]) -> Service:
        """The patient portal: a SMART app of the FHIR API's authorization server (registered
        by :meth:`register_portal` once the API is up), forwarding chat to Rasa's channel."""
        c, p = self.config, self.config.ports
        return Service(
            "portal",
            [sys.executable, "-m", "services.portal"],
            {
                **base,
                "SCANWATCH_PORTAL_PORT": str(p.portal),
                "SCANWATCH_PORTAL_FHIR_BASE_URL": c.fhir_base,
                "SCANWATCH_PORTAL_CHAT_URL": c.chat_url,
                "SCANWATCH_PORTAL_CLIENT_ID": PORTAL_CLIENT,
                "SCANWATCH_PORTAL_CLIENT_SECRET": self.portal_secret,
            },
            lambda: _http_ok(f"{c.portal_url}/healthz"),
        )

    def _console(self, base: dict[str, str]) -> Service:
        """The staff console: its pages (staff sign in at the FHIR API's authorization server;
        registered with :meth:`register_console`) and DICOMweb over the listener's file store
        (read-only; tokens verified against the FHIR API's published keys)."""
        c, p = self.config, self.config.ports
        (c.var / "console").mkdir(parents=True, exist_ok=True)
        (c.var / "store").mkdir(parents=True, exist_ok=True)  # the listener's, read only here
        return Service(
            "console",
            [sys.executable, "-m", "services.console"],
            {
                **base,
                "SCANWATCH_CONSOLE_PORT": str(p.console),
                "SCANWATCH_CONSOLE_STORAGE_DIR": str(c.var / "store"),
                "SCANWATCH_CONSOLE_INDEX_URL": f"sqlite:///{c.var / 'console' / 'dicom-index.db'}",
                "SCANWATCH_CONSOLE_JWKS_URL": f"http://127.0.0.1:{p.fhir}/auth/jwks",
                "SCANWATCH_CONSOLE_AUDIT_URL": f"sqlite:///{c.var / 'console' / 'audit.db'}",
                "SCANWATCH_CONSOLE_FHIR_BASE_URL": c.fhir_base,
                "SCANWATCH_CONSOLE_CLIENT_ID": CONSOLE_CLIENT,
                "SCANWATCH_CONSOLE_CLIENT_SECRET": self.console_secret,
                # failed studies (dead letters) for the worklist, and the operator pages
                # (training jobs, promotion, consumer lag, re-drive), when Kafka runs too
                **(
                    {"SCANWATCH_CONSOLE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{p.kafka}"}
                    if c.only is None or "kafka" in c.only
                    else {}
                ),
                "SCANWATCH_CONSOLE_MODEL_REPOSITORY": str(c.model_repository),
                "SCANWATCH_CONSOLE_LISTENER_HEALTH_URL": (
                    f"http://127.0.0.1:{p.listener_metrics}/healthz"
                ),
                "SCANWATCH_CONSOLE_MODEL_SERVER": f"127.0.0.1:{p.model_server}",
                "SCANWATCH_CONSOLE_MODEL_NAME": c.model_name,
            },
            lambda: _http_ok(f"http://127.0.0.1:{p.console}/healthz"),
        )

    def register_portal(self) -> None:
        """Register the portal as a confidential SMART app of the FHIR API's authorization
        server (its database: SQLite or PostgreSQL), with this run's secret and its redirect
        URI."""
        from scanwatch.database import make_engine
        from services.auth.clients import register_app

        engine = make_engine(self.config.fhir_database)
        try:
            register_app(
                engine,
                PORTAL_CLIENT,
                [f"{self.config.portal_url}/callback"],
                confidential=True,
                secret=self.portal_secret,
                description="scanwatch patient portal (development stack)",
            )
        finally:
            engine.dispose()

    def register_console(self) -> None:
        """Register the console as a confidential staff app of the FHIR API's authorization
        server, with this run's secret, and (re)create the development staff logins: a
        clinician and an operator with this run's password and no TOTP (development only: real
        staff accounts come from ``scanwatch staff create`` and need TOTP)."""
        from scanwatch.database import make_engine
        from services.auth.accounts import ensure_staff_account
        from services.auth.clients import register_staff_app

        engine = make_engine(self.config.fhir_database)
        try:
            register_staff_app(
                engine,
                CONSOLE_CLIENT,
                [f"http://127.0.0.1:{self.config.ports.console}/callback"],
                secret=self.console_secret,
                description="scanwatch staff console (development stack)",
            )
            ensure_staff_account(engine, DEV_STAFF_USERNAME, "clinician", self.staff_password)
            ensure_staff_account(engine, DEV_OPERATOR_USERNAME, "operator", self.staff_password)
        finally:
            engine.dispose()

    def _chatbot(self, base: dict[str, str]) -> list[Service]:
        """The Rasa action server and the Rasa server (their own virtualenv, cwd chatbot/)."""
        c, p = self.config, self.config.ports
        env = {
            **base,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{CHATBOT}",
            "RASA_TELEMETRY_ENABLED": "false",
            "SCANWATCH_CHAT_FHIR_BASE_URL": c.fhir_base,
            "SCANWATCH_CHAT_JWKS_URL": f"http://127.0.0.1:{p.fhir}/auth/jwks",
            "SCANWATCH_CHAT_TOKEN_AUDIENCE": "scanwatch-fhir-api",
            "SCANWATCH_CHAT_ACTION_URL": f"http://127.0.0.1:{p.chat_actions}/webhook",
            "SCANWATCH_CHAT_DB_URL": f"sqlite:///{c.var / 'chatbot' / 'conversations.db'}",
            "SCANWATCH_CHAT_LOCK_DIR": str(c.var / "chatbot" / "locks"),
            **{k: v for k, v in CHAT_DEFAULTS.items() if k not in base},
        }
        (c.var / "chatbot").mkdir(parents=True, exist_ok=True)
        token = self.chat_api_token
        return [
            Service(
                "chat-actions",
                [str(RASA), "run", "actions", "--actions", "actions", "-p", str(p.chat_actions)],
                {**env, "SANIC_HOST": "127.0.0.1"},  # rasa_sdk's bind address
                lambda: _http_ok(f"http://127.0.0.1:{p.chat_actions}/health"),
                cwd=CHATBOT,
            ),
            Service(
                "chat",
                [
                    str(RASA),
                    "run",
                    "--enable-api",
                    # One argument: a random token may begin with "-", which argparse would
                    # take for an option ("expected one argument").
                    f"--auth-token={token}",
                    "-i",
                    "127.0.0.1",
                    "-p",
                    str(p.chat),
                    "--credentials",
                    "credentials.yml",
                    "--endpoints",
                    "endpoints.yml",
                    "--model",
                    str(c.chat_model_dir),
                ],
                env,
                lambda: _chat_ready(f"http://127.0.0.1:{p.chat}", token),
                cwd=CHATBOT,
            ),
        ]

    def _worker(self, n: int, base: dict[str, str]) -> Service:
        """Worker ``n`` (1-based): all workers share one Faust app id, so they split the
        partitions between them; each has its own data folder and web port."""
        c, p = self.config, self.config.ports
        web = p.worker_web + n - 1
        return Service(
            "inference-worker" if c.workers == 1 else f"inference-worker-{n}",
            [sys.executable, "-m", "inference_worker"],
            {
                **base,
                "SCANWATCH_WORKER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
                "SCANWATCH_WORKER_TOPIC_REPLICATION_FACTOR": str(
                    (DEVELOPMENT if c.kafka_bootstrap_servers is None else PRODUCTION).factor
                ),
                "SCANWATCH_WORKER_DATA_DIR": str(c.var / f"worker-{n}"),
                "SCANWATCH_WORKER_WEB_PORT": str(web),
                "SCANWATCH_WORKER_QUIET_PERIOD_S": str(c.quiet_period_s),
                "SCANWATCH_WORKER_MODEL_SERVER": f"127.0.0.1:{p.model_server}",
                "SCANWATCH_WORKER_MODEL_NAME": c.model_name,
                "SCANWATCH_WORKER_FHIR_BASE_URL": c.fhir_base,
                "SCANWATCH_WORKER_FHIR_CLIENT_ID": WORKER_CLIENT,
                "SCANWATCH_WORKER_FHIR_CLIENT_SECRET": self.worker_secret,
            },
            lambda: _http_ok(f"http://127.0.0.1:{web}/healthz"),
            kafka=True,
            nice=c.scoring_nice,
        )

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def token(self, scopes: str = BANNER_SCOPES, lifetime: timedelta | None = None) -> str:
        """A development access token the stack's FHIR API accepts (the tests' and the
        banner's): signed with its key set, which its first start created."""
        issued = dev_tokens(self.config.var).issue(
            "scanwatch-dev", parse_scopes(scopes), None, lifetime
        )
        return issued[0]

    def fhir_headers(self, scopes: str = BANNER_SCOPES) -> dict[str, str]:
        """``Authorization`` with a fresh :meth:`token` (FHIR reads from tests and benches)."""
        return {"Authorization": f"Bearer {self.token(scopes)}"}

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        """Where the services reach Kafka: the configured cluster, else the stack's broker."""
        return self.config.kafka_bootstrap_servers or self.kafka.bootstrap_servers

    @property
    def _uses_kafka(self) -> bool:
        """Whether the stack runs (and supervises) its own broker: a service needs Kafka and
        no existing cluster was given."""
        return self.config.kafka_bootstrap_servers is None and any(s.kafka for s in self.services)

    def start(self, timeout: float = 180.0) -> None:
        """Start Kafka and every service; return when all are healthy."""
        self.logs.mkdir(parents=True, exist_ok=True)
        if self._uses_kafka:
            self.kafka.start()
        for service in self.services:
            self._spawn(service)
        deadline = time.monotonic() + timeout
        for service in self.services:
            self.wait_healthy(service, deadline - time.monotonic())
            if service.name == "fhir-api" and any(s.name == "portal" for s in self.services):
                self.register_portal()  # its tables exist once the API is healthy
            if service.name == "fhir-api" and any(s.name == "console" for s in self.services):
                self.register_console()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()

    def _spawn(self, service: Service) -> None:
        out = open(self.logs / f"{service.name}.log", "ab")  # noqa: SIM115 - owned by the child
        # coreutils' nice execs the service, so the pid stays the service's own.
        niced = ["nice", "-n", str(service.nice)] if service.nice else []
        service.process = subprocess.Popen(
            [*niced, *service.argv],
            env=service.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=service.cwd,
            # Its own process group, signalled whole (_signal): a service's own children (Rasa's
            # worker processes) went on running after their parent was stopped or killed.
            start_new_session=True,
        )
        out.close()
        log.info("started", extra={"service": service.name, "pid": service.process.pid})

    def wait_healthy(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            if service.process is not None and service.process.poll() is not None:
                raise StackError(
                    f"{service.name} exited with {service.process.returncode}; "
                    f"see {self.logs / (service.name + '.log')}"
                )
            if service.healthy():
                return
            time.sleep(0.2)
        raise StackError(f"{service.name} not healthy in time; see {self.logs}")

    def _supervise(self) -> None:
        """Restart services that exit (with a growing pause), the broker first, until the
        stack stops."""
        broker_restarts = 0
        while not self._stopping.wait(0.5):
            if self._uses_kafka and not self.kafka_held and self.kafka.pid() is None:
                broker_restarts += 1
                log.warning("kafka broker exited; restarting", extra={"restarts": broker_restarts})
                try:
                    self.kafka.start()  # its data and topics are kept: clients reconnect
                except Exception:  # noqa: BLE001 - try again at the next turn
                    log.exception("kafka broker restart failed")
                    if self._stopping.wait(min(2.0**broker_restarts, 30.0)):
                        return
                continue
            for service in self.services:
                proc = service.process
                if proc is None or proc.poll() is None or service.held or self._stopping.is_set():
                    continue
                service.restarts += 1
                _signal(proc, signal.SIGKILL)  # what the dead service left behind
                pause = min(2.0 ** min(service.restarts, 5), 30.0)
                log.warning(
                    "service exited; restarting",
                    extra={"service": service.name, "code": proc.returncode, "pause_s": pause},
                )
                if self._stopping.wait(pause):
                    return
                self._spawn(service)

    def kill(self, name: str) -> None:
        """SIGKILL one service, or ``"kafka"`` the broker (fault injection); the supervisor
        restarts it."""
        if name == "kafka":
            self.kafka.kill()
            return
        proc = self.service(name).process
        if proc is not None:
            _signal(proc, signal.SIGKILL)

    def pause(self, name: str) -> None:
        """SIGSTOP one service's process group (a process starved of CPU or swapped out: it
        neither runs nor exits, and its supervisor sees nothing) until :meth:`resume`."""
        proc = self.service(name).process
        if proc is not None:
            _signal(proc, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT a service paused by :meth:`pause`."""
        proc = self.service(name).process
        if proc is not None:
            _signal(proc, signal.SIGCONT)

    def hold(self, name: str) -> None:
        """Stop one service, or ``"kafka"`` the broker, and keep it down (an outage) until
        :meth:`release`."""
        if name == "kafka":
            self.kafka_held = True
            self.kafka.stop()
            return
        service = self.service(name)
        service.held = True
        if service.process is not None and service.process.poll() is None:
            _signal(service.process, signal.SIGTERM)
            service.process.wait(timeout=30)

    def release(self, name: str, timeout: float = 120.0) -> None:
        """Start a held service (or the broker) again and wait until it is healthy."""
        if name == "kafka":
            self.kafka.start(timeout)
            self.kafka_held = False
            return
        service = self.service(name)
        self._spawn(service)
        service.held = False
        self.wait_healthy(service, timeout)

    def stop(self) -> None:
        """Stop the services (SIGTERM, then SIGKILL) and the broker."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for service in reversed(self.services):
            if service.process is not None and service.process.poll() is None:
                _signal(service.process, signal.SIGTERM)
        for service in reversed(self.services):
            if service.process is None:
                continue
            try:
                service.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal(service.process, signal.SIGKILL)
                service.process.wait()
            _signal(service.process, signal.SIGKILL)  # what the service left behind
        if self._uses_kafka:
            self.kafka.stop()

    def banner(self, patient_id: str = "SW-DEMO-0001") -> str:
        """Where to send DICOM and where to read results, with ready-to-paste commands."""
        c, p = self.config, self.config.ports
        hours = BANNER_TOKEN_LIFETIME.total_seconds() / 3600
        lines = [
            "scanwatch is running.",
            f"  DICOM (C-ECHO, C-STORE): host 127.0.0.1  port {p.dicom}  AE title {c.ae_title}",
            f"  FHIR R4 API:             {c.fhir_base}  (bearer tokens required)",
            f"  Kafka:                   {self.bootstrap_servers}",
            f"  TF Serving gRPC API:     127.0.0.1:{p.model_server}  model {c.model_name}",
        ]
        if c.chatbot:
            lines += [
                f"  patient chat:            POST {c.chat_url}",
                "                           (Authorization: Bearer <patient token>, "
                '{"message": "..."})',
                f"  Rasa HTTP API:           http://127.0.0.1:{p.chat}  "
                f"(--auth-token {self.chat_api_token})",
                f"  Rasa action server:      http://127.0.0.1:{p.chat_actions}/webhook",
                f"  patient portal:          {c.portal_url}/  (sign in with an activation link)",
                f"  staff console:           http://127.0.0.1:{p.console}/  (development login: "
                f"{DEV_STAFF_USERNAME} / {self.staff_password}, a clinician;",
                f"                           {DEV_OPERATOR_USERNAME}, same password, an operator)",
                f"  DICOMweb (QIDO/WADO-RS): http://127.0.0.1:{p.console}/dicomweb"
                "  (bearer token: scanwatch token)",
            ]
        lines += [
            f"  logs:                    {self.logs}/",
            "",
            f"A development token ({BANNER_SCOPES}, valid {hours:g} h; "
            "a fresh one: .venv/bin/scanwatch token):",
            f"  export SCANWATCH_TOKEN={self.token(lifetime=BANNER_TOKEN_LIFETIME)}",
            "",
            "Send the bundled sample MR study (patient " + patient_id + "):",
            f"  .venv/bin/scanwatch send-sample --port {p.dicom} --ae-title {c.ae_title}",
            "or send your own files with dcmtk:",
            f"  TCP_NODELAY=1 storescu -aec {c.ae_title} +sd +r 127.0.0.1 {p.dicom} <folder>",
            f"then, after the quiet period ({c.quiet_period_s:g} s) and scoring:",
            f'  curl -s -H "Authorization: Bearer $SCANWATCH_TOKEN" '
            f"'{c.fhir_base}/Observation?patient=<Patient id>'",
            "  (send-sample prints the exact curl line for its patient)",
        ]
        if c.chatbot:
            lines += [
                "and ask the chatbot as that patient:",
                f"  .venv/bin/scanwatch chat --patient {patient_id}",
                "or open the activation link send-sample prints, set a password, and sign in to",
                f"the patient portal at {c.portal_url}/ (results, chart, medicines, chat).",
            ]
        return "\n".join([*lines, "", "Ctrl-C stops everything."])


#: The chatbot's settings the stack leaves at these values unless the environment sets them.
CHAT_DEFAULTS = {
    "SCANWATCH_CHAT_RATE_PER_MINUTE": "30",
    "SCANWATCH_CHAT_RATE_BURST": "10",
    "SCANWATCH_CHAT_RETENTION_DAYS": "30",
    # Rasa server worker processes: one Rasa process kept one core busy while the other idled
    # (bench/chatbot.py); more need a lock store every process sees (connectors/lock_store.py).
    "SANIC_WORKERS": "2",
}


def dev_tokens(var: Path) -> TokenService:
    """Issues tokens the development stack's FHIR API accepts: signed with its key set
    (``var/auth/signing-keys.json``, created by the API's first start, or here)."""
    return TokenService(load_key_set(StackConfig(var=var).signing_keys_file))


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to a service's process group (the service and every process it
    started); a group already gone is fine."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _chat_ready(base: str, token: str) -> bool:
    """Rasa answers /status (behind its token) with a model loaded."""
    try:
        answer = httpx.get(f"{base}/status", params={"token": token}, timeout=2.0)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and bool(answer.json().get("model_file"))


def _group_joined(bootstrap_servers: str, group: str) -> bool:
    """Whether ``group`` has members consuming (its state is Stable)."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    try:
        described = admin.describe_consumer_groups([group], request_timeout=3)[group].result(3)
    except Exception:  # noqa: BLE001 - not there yet, or Kafka busy: not healthy yet
        return False
    return bool(described.state == ConsumerGroupState.STABLE)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def model_available(target: str, model_name: str) -> bool:
    import grpc
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_pb2,
        model_service_pb2_grpc,
    )

    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=model_name)
        )
        try:
            response = stub.GetModelStatus(request, timeout=3)
        except grpc.RpcError:
            return False
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return any(v.state == available for v in response.model_version_status)
