"""Kafka on loopback for development and tests: one KRaft node, or a three-node cluster.

Apache Kafka's jars come from Maven Central (``java/kafka/pom.xml``, fetched by
``scripts/bootstrap.sh``); each node runs with ``java -cp``. :class:`LocalKafka` is one node
(broker and controller): it formats the storage once, starts, waits until it answers metadata
requests, creates the topics and stops cleanly. Alone it is the development broker (``make
run``, the test suite: replication factor 1). :class:`LocalKafkaCluster` runs three of them as
one cluster in production's shape (a three-voter controller quorum, topics with replication
factor 3 and ``min.insync.replicas`` 2, ``schemas.topics.PRODUCTION``), for the tests that
kill a broker. Production runs the brokers of ``docker-compose.yml``.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanwatch import kafka
from schemas.topics import DEVELOPMENT, PRODUCTION, TOPICS, Replication, TopicSpec

log = logging.getLogger(__name__)

_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=4
default.replication.factor={factor}
offsets.topic.replication.factor={factor}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={factor}
transaction.state.log.min.isr={min_insync}
min.insync.replicas={min_insync}
unclean.leader.election.enable=false
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


def _share(low: int, high: int) -> tuple[int, int]:
    """This process's slice of ``[low, high)``: all of it, or under pytest-xdist the worker's
    own part (``gw1`` of 2 draws from the upper half).

    Two workers drawing from one range could both find a port free and both hand it out
    before either server binds it; one server then exits with "address already in use"
    (it happened: a fault suite's FHIR API on worker 1).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        index, count = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    except (KeyError, ValueError):
        return low, high
    if not 0 <= index < count:
        return low, high
    width = (high - low) // count
    return low + index * width, low + (index + 1) * width


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and the port above it too
    (a broker's controller, a second worker's web port).

    Drawn below the kernel's ephemeral range, so that no outgoing connection can take it
    between now and the server's bind (with ``bind(0)`` one did: a worker's web port was
    taken by a client socket and the worker exited), from this process's share of that
    range (:func:`_share`), and never the same pair twice in one process.
    """
    ephemeral = _ephemeral_low()
    low, high = _share(min(20000, ephemeral // 2), ephemeral)
    for _ in range(1000):
        port = random.randrange(low, high - 1)  # the pair stays inside the share
        if {port, port + 1} & _handed_out or not (_bindable(port) and _bindable(port + 1)):
            continue
        _handed_out.update((port, port + 1))
        return port
    raise KafkaError(f"no free pair of loopback ports in {low}-{high - 1}")


class LocalKafka:
    """One KRaft broker+controller whose state lives under ``home``.

    ``libs`` is the folder of jars fetched from Maven Central. The broker survives the Python
    process unless :meth:`stop` is called; :meth:`start` on a running broker is a no-op.
    Alone (the defaults) it is a cluster of its own; :class:`LocalKafkaCluster` gives each node
    its ``node_id``, the quorum's ``voters``, a shared ``cluster_id`` and the production
    ``replication`` (the brokers' defaults for the topics they create themselves: consumer
    offsets, automatically created topics).
    """

    def __init__(
        self,
        home: Path,
        libs: Path,
        port: int = 9092,
        controller_port: int | None = None,
        heap: str = "512m",
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        replication: Replication = DEVELOPMENT,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        self.home = Path(home)
        self.libs = Path(libs)
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap
        self.node_id = node_id
        self.voters = voters or f"{node_id}@127.0.0.1:{self.controller_port}"
        self.cluster_id = cluster_id
        self.replication = replication
        #: The address clients reach it at (its listener's bind and advertised address); and
        #: the network namespace it runs in (``ip netns exec``; the fault suite's partition).
        self.host = host
        self.netns = netns

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _pid_file(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    @property
    def gc_log(self) -> Path:
        """The broker JVM's GC log (``-Xlog:gc``: a line per collection pause, the heap before
        and after it), which :func:`devtools.process_stats.gc_pauses` reads: the heap after a
        collection tells a leak from a heap that fills up to its committed size."""
        return self.home / "gc.log"

    def _java(self, main_class: str, *args: str, jvm: Sequence[str] = ()) -> list[str]:
        if not any(self.libs.glob("kafka_2.13-*.jar")):
            raise KafkaError(f"no Kafka jars in {self.libs}; run scripts/bootstrap.sh")
        return [
            *(["ip", "netns", "exec", self.netns] if self.netns else []),
            "java",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            # The client JIT only. With C2 as well, a fresh broker spent 0.6-1.9 ms of CPU per
            # ingested instance compiling during its first minutes of a development stack (as
            # much as the listener itself, on the same 2 cores); C1 alone: under 0.1 ms after
            # the first round, its requests no dearer (bench/README.md, issue 20).
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            *jvm,
            f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
            "-cp",
            f"{self.libs}/*",
            main_class,
            *args,
        ]

    def broker_command(self, props: Path) -> list[str]:
        """The broker's command line, its GC log on (:attr:`gc_log`; a line per collection,
        under a kilobyte a minute here, two files of 10 MB kept at most)."""
        gc_log = f"-Xlog:gc:file={self.gc_log}:uptime:filecount=2,filesize=10m"
        return self._java("kafka.Kafka", str(props), jvm=[gc_log])

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        props.write_text(
            _SERVER_PROPERTIES.format(
                node_id=self.node_id,
                voters=self.voters,
                host=self.host,
                port=self.port,
                controller_port=self.controller_port,
                data=self.home / "data",
                factor=self.replication.factor,
                min_insync=self.replication.min_insync,
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
        """SIGKILL the broker (fault injection): no shutdown, no flush. Returns once it is
        gone (a killed child reaped, so that :meth:`pid` says None at once)."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # started by another process: wait until it is gone
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def start(self, timeout: float = 90.0, topics: Iterable[TopicSpec] = TOPICS) -> None:
        """Format storage if new, start the broker, wait for it, create ``topics``."""
        self.launch()
        self.wait_ready(timeout)
        self.ensure_topics(topics)

    def stored_cluster_id(self) -> str | None:
        """The cluster id this node's storage was formatted with, or None before formatting."""
        try:
            lines = (self.home / "data" / "meta.properties").read_text().splitlines()
        except FileNotFoundError:
            return None
        return next((ln.split("=", 1)[1] for ln in lines if ln.startswith("cluster.id=")), None)

    def launch(self) -> None:
        """Format storage if new and start the process, without waiting for it (the nodes of a
        cluster must all be starting before any can elect a controller)."""
        props = self.home / "server.properties"
        if self.pid() is not None and f":{self.port}," not in props.read_text():
            self.stop()  # running from this home, but on other ports: restart with ours
        if self.pid() is None:
            props = self._write_config()
            if self.stored_cluster_id() is None:
                cluster_id = self.cluster_id or new_cluster_id()
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
                    self.broker_command(props),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # not killed with the terminal's process group
                )
            self._pid_file.write_text(str(proc.pid))
            log.info(
                "kafka starting", extra={"pid": proc.pid, "port": self.port, "node": self.node_id}
            )

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
                socket.create_connection((self.host, self.port), timeout=1).close()
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
                # Registered with the quorum and unfenced: it lists itself among the brokers.
                if self.node_id in admin.list_topics(timeout=3).brokers:
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


class LocalKafkaCluster:
    """``nodes`` KRaft nodes on loopback, each a broker and a controller, the controllers one
    quorum: production's shape (``schemas.topics.PRODUCTION``) on one machine, for the tests
    that take a broker away.

    Node ``i`` (1-based) keeps its state under ``home/node-<i>`` and listens on ``ports[i - 1]``
    (default: :func:`free_port`), its controller on the port above. Every node is formatted
    with one cluster id. :meth:`kill` is ``kill -9`` of one node; :meth:`start` with a node id
    brings it back from its own log folder.
    """

    def __init__(
        self,
        home: Path,
        libs: Path,
        ports: Sequence[int] | None = None,
        nodes: int = 3,
        heap: str = "512m",
    ) -> None:
        if nodes < PRODUCTION.factor:
            raise ValueError(f"a cluster needs at least {PRODUCTION.factor} nodes, not {nodes}")
        ports = list(ports) if ports is not None else [free_port() for _ in range(nodes)]
        if len(ports) != nodes:
            raise ValueError(f"{nodes} nodes need {nodes} ports, not {len(ports)}")
        self.home = Path(home)
        voters = ",".join(f"{i}@127.0.0.1:{port + 1}" for i, port in enumerate(ports, 1))
        self.nodes = {
            i: LocalKafka(
                self.home / f"node-{i}",
                libs,
                port=port,
                controller_port=port + 1,
                heap=heap,
                node_id=i,
                voters=voters,
                replication=PRODUCTION,
            )
            for i, port in enumerate(ports, 1)
        }
        stored = {n.stored_cluster_id() for n in self.nodes.values()} - {None}
        if len(stored) > 1:
            raise KafkaError(f"the nodes under {self.home} belong to different clusters: {stored}")
        cluster_id = stored.pop() if stored else new_cluster_id()
        for node in self.nodes.values():
            node.cluster_id = cluster_id

    @property
    def bootstrap_servers(self) -> str:
        """Every node's address: what a client is given (it needs only one to be up)."""
        return ",".join(n.bootstrap_servers for n in self.nodes.values())

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_servers}, logger=log)

    def pid(self, node_id: int) -> int | None:
        """PID of node ``node_id``, or None when it is not running."""
        return self.nodes[node_id].pid()

    def start(
        self,
        node_id: int | None = None,
        timeout: float = 120.0,
        topics: Iterable[TopicSpec] = TOPICS,
    ) -> None:
        """Start every node (``node_id`` None), wait until each has joined, create ``topics``
        and wait until their replicas are in sync; or start node ``node_id`` alone and wait
        until it has joined (:meth:`wait_in_sync` then says when it has caught up)."""
        deadline = time.monotonic() + timeout
        chosen = list(self.nodes.values()) if node_id is None else [self.nodes[node_id]]
        for node in chosen:  # all launched first: no node is ready before the quorum is
            node.launch()
        for node in chosen:
            node.wait_ready(max(deadline - time.monotonic(), 1.0))
        self.wait_joined(max(deadline - time.monotonic(), 1.0))
        if node_id is None:
            names = [t.name for t in topics]
            kafka.ensure_topics(self.bootstrap_servers, topics)
            self.wait_in_sync(names, max(deadline - time.monotonic(), 1.0))

    def wait_joined(self, timeout: float) -> None:
        """Block until every running node's metadata lists every running node, and no other:
        a node that is ready itself may not have heard of the others yet, nor of one just
        killed being fenced (topics created then would count the brokers wrong)."""
        from confluent_kafka.admin import AdminClient

        def listed_by(node_id: int) -> set[int] | None:
            """The brokers in ``node_id``'s own metadata; None when another node answered (a
            client bootstrapped from one node may send its request to any node it has learnt
            of: CI once judged node 2's view twice while node 1 still listed the killed one)."""
            node = self.nodes[node_id]
            metadata = AdminClient({"bootstrap.servers": node.bootstrap_servers}).list_topics(
                timeout=3
            )
            # -1: answered on the bootstrap connection itself, which is this node's
            return set(metadata.brokers) if metadata.orig_broker_id in (-1, node_id) else None

        deadline = time.monotonic() + timeout
        everyone = {i for i, n in self.nodes.items() if n.pid() is not None}
        while time.monotonic() < deadline:
            try:
                if all(listed_by(i) == everyone for i in sorted(everyone)):
                    return
            except Exception:  # noqa: BLE001 - metadata not answered: not yet
                pass
            time.sleep(0.25)
        raise KafkaError(f"nodes {sorted(everyone)} did not all join the cluster in time")

    def kill(self, node_id: int) -> None:
        """``kill -9`` node ``node_id`` (fault injection): no shutdown, no flush."""
        self.nodes[node_id].kill()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for node in self.nodes.values():
            node.stop()

    def leader_of(self, topic: str, partition: int, timeout: float = 10.0) -> int:
        """The node id leading ``partition`` of ``topic`` (-1 while it has none)."""
        metadata = self._admin().list_topics(topic, timeout=timeout)
        return int(metadata.topics[topic].partitions[partition].leader)

    def in_sync(self, topics: Iterable[str], timeout: float = 10.0) -> bool:
        """Whether every partition of ``topics`` has a leader and all its replicas in sync."""
        metadata = self._admin().list_topics(timeout=timeout)
        for name in topics:
            described = metadata.topics.get(name)
            if described is None or described.error is not None:
                return False
            for p in described.partitions.values():
                if p.leader < 0 or sorted(p.isrs) != sorted(p.replicas):
                    return False
        return True

    def wait_in_sync(self, topics: Iterable[str], timeout: float = 120.0) -> None:
        """Block until :meth:`in_sync` (a restarted node has caught up), or raise KafkaError."""
        names = list(topics)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.in_sync(names):
                    return
            except Exception:  # noqa: BLE001 - metadata not answered: not yet
                pass
            time.sleep(0.25)
        raise KafkaError(f"replicas of {names} not in sync after {timeout}s")

    def end_offsets(self, topic: str, timeout: float = 10.0) -> dict[int, int]:
        """Each partition's end offset (how many messages it has taken)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap_servers, "group.id": f"offsets-{uuid.uuid4()}"},
            logger=log,
        )
        try:
            partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
                for p in partitions
            }
        finally:
            consumer.close()


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
