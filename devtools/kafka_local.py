"""A single-node Kafka (KRaft broker + controller) on loopback, for development and tests.

Apache Kafka's jars come from Maven Central (``java/kafka/pom.xml``, fetched by
``scripts/bootstrap.sh``); the broker runs with ``java -cp``. :class:`LocalKafka` formats the
storage once, starts the broker, waits until it answers metadata requests, creates the topics and
stops it cleanly. Production runs a real cluster (``docker-compose.yml``).
"""

from __future__ import annotations

import base64
import logging
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from scanwatch import kafka
from schemas.topics import TOPICS, TopicSpec

log = logging.getLogger(__name__)

_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.flush.interval.messages=9223372036854775807
"""

_LOG4J = """\
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=WARN
"""


class KafkaError(RuntimeError):
    """The local broker could not be started or reached."""


def new_cluster_id() -> str:
    """A random KRaft cluster id: a UUID in URL-safe base64, as ``kafka-storage random-uuid``
    makes it. Like Kafka's, it never starts with '-', which the tool would read as an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


#: Ports handed out by :func:`free_port` in this process (each with the port above it).
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives to outgoing connections (Linux's default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and the port above it too
    (a broker's controller, a second worker's web port).

    Drawn below the kernel's ephemeral range, so that no outgoing connection can take it
    between now and the server's bind (with ``bind(0)`` one did: a worker's web port was
    taken by a client socket and the worker exited), and never the same pair twice in one
    process.
    """
    high = _ephemeral_low() - 2
    low = min(20000, high // 2)
    for _ in range(1000):
        port = random.randrange(low, high)
        if {port, port + 1} & _handed_out or not (_bindable(port) and _bindable(port + 1)):
            continue
        _handed_out.update((port, port + 1))
        return port
    raise KafkaError(f"no free pair of loopback ports in {low}-{high + 1}")


class LocalKafka:
    """One KRaft broker+controller whose state lives under ``home``.

    ``libs`` is the folder of jars fetched from Maven Central. The broker survives the Python
    process unless :meth:`stop` is called; :meth:`start` on a running broker is a no-op.
    """

    def __init__(
        self,
        home: Path,
        libs: Path,
        port: int = 9092,
        controller_port: int | None = None,
        heap: str = "512m",
    ) -> None:
        self.home = Path(home)
        self.libs = Path(libs)
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def _pid_file(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    def _java(self, main_class: str, *args: str) -> list[str]:
        if not any(self.libs.glob("kafka_2.13-*.jar")):
            raise KafkaError(f"no Kafka jars in {self.libs}; run scripts/bootstrap.sh")
        return [
            "java",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
            "-cp",
            f"{self.libs}/*",
            main_class,
            *args,
        ]

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        props.write_text(
            _SERVER_PROPERTIES.format(
                port=self.port, controller_port=self.controller_port, data=self.home / "data"
            )
        )
        (self.home / "log4j.properties").write_text(_LOG4J.format(log=self.log_file))
        return props

    def pid(self) -> int | None:
        """PID of the running broker started from ``home``, or None (a broker that died as
        this process's child is reaped first: a zombie is not a running broker)."""
        try:
            pid = int(self._pid_file.read_text())
            _reap(pid)
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def kill(self) -> None:
        """SIGKILL the broker (fault injection): no shutdown, no flush."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)

    def start(self, timeout: float = 90.0, topics: Iterable[TopicSpec] = TOPICS) -> None:
        """Format storage if new, start the broker, wait for it, create ``topics``."""
        props = self.home / "server.properties"
        if self.pid() is not None and f":{self.port}," not in props.read_text():
            self.stop()  # running from this home, but on other ports: restart with ours
        if self.pid() is None:
            props = self._write_config()
            if not (self.home / "data" / "meta.properties").exists():
                cluster_id = new_cluster_id()
                formatted = subprocess.run(
                    self._java(
                        "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)
                    ),
                    capture_output=True,
                    text=True,
                )
                if formatted.returncode != 0:
                    raise KafkaError(f"formatting KRaft storage failed: {formatted.stderr[-2000:]}")
            with open(self.home / "stdout.log", "ab") as out:
                proc = subprocess.Popen(
                    self._java("kafka.Kafka", str(props)),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # not killed with the terminal's process group
                )
            self._pid_file.write_text(str(proc.pid))
            log.info("kafka starting", extra={"pid": proc.pid, "port": self.port})
        self.wait_ready(timeout)
        self.ensure_topics(topics)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until the broker answers a metadata request, or raise :class:`KafkaError`."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise KafkaError(
                    f"broker exited; see {self.log_file} and {self.home / 'stdout.log'}"
                )
            try:
                # Only once the port accepts: a librdkafka client would log every refused
                # connection to stderr while the JVM starts.
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
                if admin.list_topics(timeout=3).brokers:
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
            time.sleep(0.25)
        raise KafkaError(f"broker not ready after {timeout}s: {last}")

    def ensure_topics(self, topics: Iterable[TopicSpec]) -> None:
        """Create the topics that do not exist yet (existing ones are left as they are)."""
        kafka.ensure_topics(self.bootstrap_servers, topics)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``)."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            _reap(pid)
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
        self._pid_file.unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect a child's exit status, so that a stopped child does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass(frozen=True)
class Record:
    """One message read back by :func:`read_topic`."""

    key: bytes | None
    value: bytes
    partition: int
    headers: dict[str, bytes]


def read_topic(
    bootstrap_servers: str,
    topic: str,
    until: Callable[[list[Record]], bool],
    timeout: float = 30.0,
    settle_s: float = 0.0,
) -> list[Record]:
    """Read ``topic`` from its start, for tests and benchmarks, until ``until(records so far)``
    holds and then ``settle_s`` longer (so that extra messages would be seen too), or until
    ``timeout`` seconds pass; return every record read. The caller asserts on what came."""
    consumer = kafka.new_consumer(bootstrap_servers, f"read-{uuid.uuid4().hex}", [topic])
    read: list[Record] = []
    deadline = time.monotonic() + timeout
    settled: float | None = None
    try:
        while time.monotonic() < deadline and (settled is None or time.monotonic() < settled):
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                raw = message.headers() or []
                pairs = raw.items() if isinstance(raw, dict) else raw
                headers = {k: v.encode() if isinstance(v, str) else v or b"" for k, v in pairs}
                read.append(
                    Record(message.key(), message.value() or b"", message.partition() or 0, headers)
                )
            if settled is None and until(read):
                settled = time.monotonic() + settle_s
    finally:
        consumer.close()
    return read


def partition_count(bootstrap_servers: str, topic: str, timeout: float = 10.0) -> int:
    """How many partitions ``topic`` has on the cluster."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": bootstrap_servers}).list_topics(topic, timeout)
    return len(metadata.topics[topic].partitions)
