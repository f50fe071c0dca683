"""The fault suite: real traffic through the whole stack while one fault is injected, then a
count of every instance. ``tests/faults/`` (CI-sized rows) and ``bench/faults.py`` (the whole
table, ``bench/faults.md``) both run it.

A :class:`Sender` streams studies with dcmtk ``storescu``, one association per study, as a
modality does; an instance it did not see answered Success (the association broke, or the
listener refused it) is sent again after a pause, until every one is acknowledged or its
retry time runs out. Meanwhile a :class:`Fault` fires once the listener has answered a chosen
share of the row's instances (mid-association: half a study past a study boundary), and ends
when the component is back. The row then waits, bounded, until the pipeline has settled, and
counts (:class:`Row`).

What each column means (the same words in ``bench/faults.md``):

- **acked**: instances storescu saw answered Success (its ``-v`` log), each counted once;
  **resent**: instances handed to storescu again after a broken association or a failure
  status (each retry counts the study's whole remainder, also when the connection was refused);
  **associations**: storescu runs; **refused**: C-STOREs answered with a failure status.
- **stored**: acked instances whose file is in the store (any version).
- **events** / **distinct**: ``dicom.instance.received.v1`` records of the row's studies,
  all of them and distinct SOPInstanceUIDs (at-least-once: more records than distinct ones is
  allowed, the worker's assembly is idempotent).
- **scored**: studies with an ``inference.result.v1`` whose ``slice_count`` covers every
  acked instance of the study; **rescored**: further results of a complete study (a
  redelivery after a crash); the same probabilities are harmless, other ones count as
  duplicated; **partial**: results on part of a study (its quiet period passed before the rest
  arrived: the Observation is amended when it does, not duplicated).
- **observations**: FHIR Observations of the row's patients; more than one per (study, model
  version) counts as duplicated; **obs_versions**: their summed ``meta.versionId`` (above
  observations: an Observation was amended, e.g. scored on the slices that had arrived when the
  quiet period passed mid-send, then again whole); **reissued**: Observation versions whose
  result is the previous version's (only ``issued`` or the narrative changed): a rescoring
  that changed the Observation, counted as duplicated.
- **dead_letters**: dead letters keyed by one of the row's studies, on every ``<topic>.dlq``.
- **lost**: per study, the most acked instances missing from any of: the store, the events,
  the scoring (the complete result's ``slice_count``), an Observation.
- **recover_s**: from the later of the fault's end (the component healthy again, space freed,
  the link up) and the sender's last acknowledgement, to the first moment every study was
  scored complete and no pipeline consumer group lagged on any topic. The no-fault row gives
  the same figure for an undisturbed run: the quiet period plus scoring.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom

from devtools.cli import dev_tokens
from devtools.peers import PeerError, storescu
from devtools.postgres_local import LocalPostgres
from devtools.stack import Stack
from devtools.testing import wait_for
from scanwatch import ids, kafka
from scanwatch.sample import build_mr_study
from scanwatch.store_layout import parse_file_name
from schemas.events import InferenceResultV1, InstanceReceivedV1
from schemas.topics import TOPICS
from services.auth.scopes import parse_scopes
from services.console.pipeline import consumer_lag

log = logging.getLogger(__name__)

DEAD_LETTER_TOPICS = tuple(t.name for t in TOPICS if t.name.endswith(".dlq"))
_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")
_RECEIVED_METRIC = "scanwatch_listener_instances_received_total"
#: Observation elements that may change without the result changing (when it was issued, the
#: generated narrative).
RESULT_NEUTRAL = frozenset({"issued", "text"})


# --- studies and the sender ---------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One study to send: its patient, its UID and its files with their SOPInstanceUIDs."""

    patient_id: str
    study_uid: str
    sops: dict[Path, str]

    @property
    def files(self) -> list[Path]:
        return list(self.sops)


def build_studies(folder: Path, prefix: str, count: int, instances: int) -> list[Study]:
    """``count`` studies of ``instances`` slices, each of its own patient ``<prefix>-<n>``."""
    studies = []
    for n in range(count):
        patient = f"{prefix}-{n:03d}"
        files = build_mr_study(folder / patient, patient_id=patient, n_slices=instances, seed=n)
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        studies.append(
            Study(
                patient,
                str(headers[0].StudyInstanceUID),
                {f: str(h.SOPInstanceUID) for f, h in zip(files, headers, strict=True)},
            )
        )
    return studies


def acknowledged(output: str) -> tuple[list[Path], list[str]]:
    """From storescu's ``-v`` log: the files answered Success, and the other statuses seen."""
    acked: list[Path] = []
    other: list[str] = []
    current: Path | None = None
    for line in output.splitlines():
        if sending := _SENDING.match(line):
            current = Path(sending.group(1))
        elif (response := _RESPONSE.match(line)) and current is not None:
            if response.group(1) == "Success":
                acked.append(current)
            else:
                other.append(response.group(1))
            current = None
    return acked, other


@dataclass
class Sender:
    """Sends studies as a modality does: what was not acknowledged is sent again."""

    host: str
    port: int
    called_ae: str
    #: How long one study may take to be acknowledged whole, resends included.
    retry_for_s: float = 300.0
    #: The pause before a resend (a modality's retry interval).
    retry_pause_s: float = 1.0
    acked: dict[str, set[str]] = field(default_factory=dict)
    resent: int = 0
    associations: int = 0
    broken: int = 0  # storescu runs that did not end with every file acknowledged
    refused: Counter[str] = field(default_factory=Counter)
    last_ack: float = 0.0
    unacknowledged: int = 0  # instances given up on after retry_for_s
    #: Called before each association (a fault's row holds the sender there until it fires).
    before_association: Callable[[], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def acked_count(self) -> int:
        return sum(len(s) for s in self.acked.values())

    def send(self, study: Study) -> None:
        pending = study.files
        done = self.acked.setdefault(study.study_uid, set())
        deadline = time.monotonic() + self.retry_for_s
        while pending:
            if self.before_association is not None:
                self.before_association()
            self.associations += 1
            try:
                result = storescu(pending, self.host, self.port, called_ae=self.called_ae)
                output = result.stdout + result.stderr
            except PeerError as exc:
                output = exc.output
            paths, other = acknowledged(output)
            self.refused.update(other)
            if paths:
                self.last_ack = time.monotonic()
            done.update(study.sops[p] for p in paths if p in study.sops)
            left = [f for f in pending if study.sops[f] not in done]
            if not left:
                return
            self.broken += 1
            if time.monotonic() >= deadline or self._stop.is_set():
                self.unacknowledged += len(left)
                log.warning("study not acknowledged whole", extra={"missing": len(left)})
                return
            self.resent += len(left)
            pending = left
            self._stop.wait(self.retry_pause_s)

    def send_all(self, studies: Sequence[Study]) -> None:
        for study in studies:
            self.send(study)

    def stop(self) -> None:
        self._stop.set()


# --- what the pipeline produced -----------------------------------------------------------------


class Tail:
    """Reads the instance, result and dead-letter topics from their start in a thread, keeping
    the records keyed by one of ``studies`` (every study-keyed topic is keyed by its UID)."""

    def __init__(self, bootstrap_servers: str, studies: set[str]) -> None:
        self.studies = studies
        self.instances: list[InstanceReceivedV1] = []
        self.results: list[InferenceResultV1] = []
        self.dead_letters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = kafka.new_consumer(
            bootstrap_servers,
            f"read-faults-{os.getpid()}-{time.monotonic_ns()}",
            [InstanceReceivedV1.SCHEMA, InferenceResultV1.SCHEMA, *DEAD_LETTER_TOPICS],
        )
        self._thread = threading.Thread(target=self._run, name="fault-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                message = self._consumer.poll(0.2)
                if message is None or message.error() is not None:
                    continue
                key = (message.key() or b"").decode(errors="replace")
                if key not in self.studies:
                    continue
                topic, value = message.topic() or "", message.value() or b""
                with self._lock:
                    if topic == InstanceReceivedV1.SCHEMA:
                        self.instances.append(InstanceReceivedV1.from_bytes(value))
                    elif topic == InferenceResultV1.SCHEMA:
                        self.results.append(InferenceResultV1.from_bytes(value))
                    else:
                        self.dead_letters[topic] += 1
        finally:
            self._consumer.close()

    def snapshot(self) -> tuple[list[InstanceReceivedV1], list[InferenceResultV1], int]:
        with self._lock:
            return list(self.instances), list(self.results), sum(self.dead_letters.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def total_lag(bootstrap_servers: str) -> int | None:
    """Summed lag of every pipeline consumer group (None: Kafka did not answer)."""
    try:
        return sum(lag.lag for lag in consumer_lag(bootstrap_servers, timeout=5))
    except Exception:  # noqa: BLE001 - a broker restarting: not settled yet
        return None


def fhir_headers(stack: Stack) -> dict[str, str]:
    """A backend's read token for the stack's FHIR API (ignored when it requires none)."""
    token = dev_tokens(stack.config.var).issue("scanwatch-faults", parse_scopes("system/*.read"))
    return {"Authorization": f"Bearer {token[0]}"}


def observations(stack: Stack, patient_id: str) -> list[dict]:
    """Every Observation of the patient of DICOM ``patient_id``."""
    answer = httpx.get(
        f"{stack.config.fhir_base}/Observation",
        params={"patient": ids.patient_id(None, patient_id), "_count": 200},
        headers=fhir_headers(stack),
        timeout=30,
    )
    answer.raise_for_status()
    return [e["resource"] for e in answer.json().get("entry", [])]


def unchanged_versions(stack: Stack, observation: dict) -> list[set[str]]:
    """For each later version of ``observation`` whose result is the previous version's (the
    same values, only these top-level elements changed: e.g. ``issued``), the set of elements
    that changed. Such a version is a rescoring that changed the Observation without changing
    the result: the fault suite counts it as duplicated."""
    if int(observation.get("meta", {}).get("versionId", 1)) <= 1:
        return []
    answer = httpx.get(
        f"{stack.config.fhir_base}/Observation/{observation['id']}/_history",
        params={"_count": 200},
        headers=fhir_headers(stack),
        timeout=30,
    )
    answer.raise_for_status()
    versions = sorted(
        (e["resource"] for e in answer.json().get("entry", [])),
        key=lambda r: int(r["meta"]["versionId"]),
    )
    unchanged = []
    for before, after in itertools.pairwise(versions):
        changed = {
            k for k in before.keys() | after.keys() if k != "meta" and before.get(k) != after.get(k)
        }
        if changed <= RESULT_NEUTRAL:
            unchanged.append(changed)
    return unchanged


def stored_sops(store: Path, study_uid: str) -> set[str]:
    """SOPInstanceUIDs with a file (any version) under the study's folder."""
    folder = store / study_uid
    if not folder.is_dir():
        return set()
    return {
        parsed[0]
        for path in folder.glob("*/*.dcm")
        if (parsed := parse_file_name(path.name)) is not None
    }


def listener_metric(stack: Stack, name: str) -> float | None:
    """One unlabelled sample of the listener's ``/metrics`` (None: down, or no such sample)."""
    url = f"http://127.0.0.1:{stack.config.ports.listener_metrics}/metrics"
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def listener_received(stack: Stack) -> int | None:
    """The listener's count of C-STOREs answered Success since it started (None: down)."""
    received = listener_metric(stack, _RECEIVED_METRIC)
    return None if received is None else int(received)


# --- faults -------------------------------------------------------------------------------------


# --- the network between the broker and everything else -----------------------------------------


class BrokerNetwork:
    """A network namespace for the broker, joined to this one by a veth pair: the broker
    listens on ``host`` (inside), every client reaches it through the pair, and the link can be
    slowed (``tbf``) and cut (a blackhole route inside: the broker's answers vanish, so its
    clients see silence, not a refusal). Linux's own tools only (``ip``, ``tc``); root only.

    This kernel has no ``netem`` qdisc (``tc qdisc add dev lo root netem delay 10ms``:
    "Specified qdisc kind is unknown") and no tc actions (``gact``: "Failed to load TC action
    module"), so neither random loss nor a fixed delay can be made; ``tbf`` at a low rate
    delays by queueing instead.
    """

    def __init__(self, index: int | None = None) -> None:
        self.index = index if index is not None else os.getpid() % 250
        self.name = f"scanwatch-faults-{self.index}"
        self.outside, self.inside = f"swf{self.index}a", f"swf{self.index}b"
        self.peer = f"10.231.{self.index}.1"  # this side
        self.host = f"10.231.{self.index}.2"  # the broker's side

    def _ip(self, *args: str, inside: bool = False, check: bool = True) -> None:
        command = ["ip", *(["-n", self.name] if inside else []), *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")

    def _tc(self, *args: str, inside: bool = False, check: bool = True) -> None:
        prefix = ["ip", "netns", "exec", self.name] if inside else []
        done = subprocess.run([*prefix, "tc", *args], capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")

    def create(self) -> None:
        self.delete()  # a namespace left by a run that was killed
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        self._ip("link", "set", self.inside, "netns", self.name)
        self._ip("addr", "add", f"{self.peer}/30", "dev", self.outside)
        self._ip("link", "set", self.outside, "up")
        self._ip("addr", "add", f"{self.host}/30", "dev", self.inside, inside=True)
        self._ip("link", "set", self.inside, "up", inside=True)
        self._ip("link", "set", "lo", "up", inside=True)

    def delete(self) -> None:
        self._ip("link", "del", self.outside, check=False)
        self._ip("netns", "del", self.name, check=False)

    def slow(self, rate: str = "256kbit") -> None:
        """Both directions through a token bucket at ``rate`` (queueing delay, up to 2 s)."""
        for inside, dev in ((False, self.outside), (True, self.inside)):
            self._tc(
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                "burst", "16kbit", "latency", "2s", inside=inside,
            )  # fmt: skip

    def partition(self) -> None:
        self._ip("route", "add", "blackhole", f"{self.peer}/32", inside=True)

    def heal(self) -> None:
        self._ip("route", "del", "blackhole", f"{self.peer}/32", inside=True, check=False)
        for inside, dev in ((False, self.outside), (True, self.inside)):
            self._tc("qdisc", "del", "dev", dev, "root", inside=inside, check=False)

    def __enter__(self) -> BrokerNetwork:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


@dataclass
class FaultRun:
    """What a fault acts on, and when it started and ended (monotonic seconds). ``in_effect``
    is set once it has begun."""

    stack: Stack
    sender: Sender
    postgres: LocalPostgres | None = None
    network: BrokerNetwork | None = None
    hold_s: float = 30.0
    started: float | None = None
    ended: float | None = None
    detail: str = ""
    in_effect: threading.Event = field(default_factory=threading.Event)

    def begin(self) -> None:
        self.started = time.monotonic()
        self.in_effect.set()

    def end(self) -> None:
        self.ended = time.monotonic()


@dataclass(frozen=True)
class Fault:
    """One row of the table: a name, what it does, and the code that does it (it returns once
    the fault has ended: the component is back)."""

    name: str
    description: str
    inject: Callable[[FaultRun], None]
    #: The share of the row's instances the listener has acknowledged when it fires.
    at: float = 0.3


def _restarted(run: FaultRun, name: str, timeout: float = 600.0) -> None:
    """Kill ``name`` with SIGKILL; return once the supervisor has it healthy again."""
    stack = run.stack
    service = stack.service(name)
    before = service.restarts
    run.begin()
    stack.kill(name)
    wait_for(lambda: service.restarts > before, timeout, f"{name} restarted")
    wait_for(
        lambda: (
            service.process is not None and service.process.poll() is None and service.healthy()
        ),
        timeout,
        f"{name} healthy again",
        interval=0.2,
    )
    run.end()


def kill_broker(run: FaultRun) -> None:
    stack = run.stack
    first = stack.kafka.pid()
    run.begin()
    stack.kill("kafka")
    wait_for(lambda: stack.kafka.pid() not in (None, first), 180, "the broker restarted")
    stack.kafka.wait_ready(180)
    run.end()


def kill_worker(n: int) -> Callable[[FaultRun], None]:
    def inject(run: FaultRun) -> None:
        _restarted(run, f"inference-worker-{n}")

    return inject


def hold_model_server(run: FaultRun) -> None:
    run.begin()
    run.stack.hold("model-server")
    threading.Event().wait(run.hold_s)  # the outage's length: the fault itself
    run.stack.release("model-server", timeout=600)  # TensorFlow starts slowly on a loaded machine
    run.end()


def kill_fhir_api(run: FaultRun) -> None:
    _restarted(run, "fhir-api")


def stop_postgres(run: FaultRun) -> None:
    if run.postgres is None:
        raise RuntimeError("this fault needs the stack's FHIR API on a LocalPostgres")
    run.begin()
    run.postgres.stop()
    threading.Event().wait(run.hold_s)
    run.postgres.resume()
    run.end()


def kill_listener(run: FaultRun) -> None:
    _restarted(run, "dicom-listener")


def fill(path: Path, keep: int) -> None:
    """Allocate ``path`` until its filesystem has at most ``keep`` bytes free (below any
    watermark the suite sets, so the listener's admission refuses; a write racing it meets
    ENOSPC, also a failure status). The listener writes meanwhile, so a chunk that no longer
    fits is halved, not an error."""
    offset, chunk = 0, 64 * 2**20
    with open(path, "wb") as fp:
        while (spare := shutil.disk_usage(path.parent).free - keep) > 0:
            size = min(chunk, spare)
            try:
                os.posix_fallocate(fp.fileno(), offset, size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if size <= 64 * 2**10:
                    return  # full
                chunk = size // 2
                continue
            offset += size


def fill_store(run: FaultRun) -> None:
    """Fill the store's filesystem to below the listener's free-space watermark until the
    sender has been refused, keep it full a while, then free the space."""
    store = run.stack.config.var / "store"
    filler = store / ".fault-filler"
    try:
        fill(filler, keep=2**20)
        run.begin()  # the fault is a full disk: it begins once the disk is full
        wait_for(lambda: sum(run.sender.refused.values()), 120, "a refused C-STORE", 0.1)
        threading.Event().wait(min(run.hold_s, 10.0))
        run.detail = f"free while full: {shutil.disk_usage(store).free} bytes"
    finally:
        filler.unlink()
    run.end()


def cut_broker_network(run: FaultRun) -> None:
    """The link to the broker slowed for a third of ``hold_s``, then cut for ``hold_s``, then
    healed; over once the broker answers through it again."""
    network = run.network
    if network is None:
        raise RuntimeError("this fault needs the broker in a BrokerNetwork")
    run.begin()
    try:
        network.slow()
        threading.Event().wait(run.hold_s / 3)
        network.partition()
        threading.Event().wait(run.hold_s)
    finally:
        network.heal()
    run.stack.kafka.wait_ready(180)
    run.end()
    run.detail = (
        f"tbf 256kbit for {run.hold_s / 3:g} s, then a blackhole route in the broker's "
        f"namespace for {run.hold_s:g} s (no netem on this kernel)"
    )


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        Fault("none", "no fault: the baseline", lambda run: None),
        Fault("broker-kill", "Kafka broker kill -9; the stack restarts it", kill_broker),
        Fault("worker-1-kill", "inference worker 1 of 2 kill -9; restarted", kill_worker(1)),
        Fault("worker-2-kill", "inference worker 2 of 2 kill -9; restarted", kill_worker(2)),
        Fault(
            "model-server-late",
            "model server stopped, started again after hold_s",
            hold_model_server,
        ),
        Fault("fhir-api-kill", "FHIR API kill -9; restarted", kill_fhir_api),
        Fault(
            "postgres-stop",
            "PostgreSQL (the FHIR API's database) stopped for hold_s",
            stop_postgres,
        ),
        Fault(
            "listener-kill",
            "DICOM listener kill -9 mid-association; restarted",
            kill_listener,
            # Half a study in. Fired at 30 %, the kill once landed after the last of the CI row's
            # 32 small instances was acknowledged (the suite on both cores): nothing to resend.
            at=0.0,
        ),
        Fault(
            "disk-full",
            "the store's filesystem (a tmpfs) filled, then freed",
            fill_store,
            # Half a study in: fired at 30 %, the CI row's last 19 small instances were all
            # stored before the filler had filled the disk, and nothing was left to refuse.
            # (The sender now waits for the full disk before its next association, too.)
            at=0.0,
        ),
        Fault(
            "kafka-partition",
            "the broker in its own network namespace: the veth link slowed, then cut, healed",
            cut_broker_network,
        ),
    ]
}


# --- a row --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One fault's counts (see the module docstring for what each means)."""

    fault: str
    studies: int
    instances: int  # per study
    acked: int = 0
    resent: int = 0
    refused: int = 0
    stored: int = 0
    events: int = 0
    distinct: int = 0
    scored: int = 0
    rescored: int = 0
    partial: int = 0  # results on part of a study (the quiet period passed mid-send)
    reissued: int = 0  # Observation versions that changed nothing of the result
    observations: int = 0
    obs_versions: int = 0  # summed meta.versionId: more than observations means amended
    associations: int = 0
    dead_letters: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_s: float | None = None
    fault_s: float | None = None
    unacknowledged: int = 0
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.lost == 0
            and self.duplicated == 0
            and self.unacknowledged == 0
            and self.recover_s is not None
            and self.acked == self.studies * self.instances
        )


COLUMNS = (
    "fault",
    "studies",
    "instances",
    "acked",
    "resent",
    "refused",
    "stored",
    "events",
    "distinct",
    "scored",
    "rescored",
    "partial",
    "observations",
    "obs_versions",
    "reissued",
    "associations",
    "dead_letters",
    "lost",
    "duplicated",
    "fault_s",
    "recover_s",
)


def row_cells(row: Row) -> list[str]:
    cells = []
    for name in COLUMNS:
        value = getattr(row, name)
        cells.append(
            "—" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)
        )
    return cells


def _complete(results: list[InferenceResultV1], acked: set[str]) -> list[InferenceResultV1]:
    return [r for r in results if r.slice_count >= len(acked)]


def run_row(
    stack: Stack,
    fault: Fault,
    studies: Sequence[Study],
    *,
    postgres: LocalPostgres | None = None,
    network: BrokerNetwork | None = None,
    hold_s: float = 30.0,
    settle_timeout_s: float = 600.0,
    sender: Sender | None = None,
) -> Row:
    """Send ``studies`` while ``fault`` fires, wait for the pipeline to settle (bounded by
    ``settle_timeout_s`` after the last acknowledgement), and count."""
    config = stack.config
    instances = len(studies[0].sops)
    row = Row(fault.name, len(studies), instances)
    sender = sender or Sender("127.0.0.1", config.ports.dicom, config.ae_title)
    run = FaultRun(stack, sender, postgres=postgres, network=network, hold_s=hold_s)
    tail = Tail(stack.bootstrap_servers, {s.study_uid for s in studies})
    # A tuple: a count of 0 (a listener just started) is an answer too.
    answered: tuple[int] | None = wait_for(
        lambda: (n,) if (n := listener_received(stack)) is not None else None,
        60,
        "the listener's metrics",
    )
    assert answered is not None
    fire_at = answered[0] + int(len(studies) * instances * fault.at) + instances // 2
    failure: list[BaseException] = []

    def inject() -> None:
        try:
            wait_for(
                lambda: (listener_received(stack) or 0) >= fire_at,
                settle_timeout_s,
                "the fault's moment",
                interval=0.02,
            )
            fault.inject(run)
        except BaseException as exc:  # noqa: BLE001 - reported in the row
            failure.append(exc)
        finally:
            run.in_effect.set()  # a fault that failed holds no sender

    def hold_for_the_fault() -> None:
        """Past the fault's moment, no new association until the fault has begun: on two
        loaded cores the sender otherwise finished the row before a disk could be filled
        (every instance stored, nothing refused)."""
        if not run.in_effect.is_set() and (listener_received(stack) or 0) >= fire_at:
            run.in_effect.wait(settle_timeout_s)

    sender.before_association = hold_for_the_fault
    injector = threading.Thread(target=inject, name=f"fault-{fault.name}", daemon=True)
    try:
        injector.start()
        sender.send_all(studies)
        injector.join(timeout=settle_timeout_s)
        if failure:
            row.problems.append(f"fault did not complete: {failure[0]!r}")
        elif injector.is_alive():
            row.problems.append("fault still running after the settle timeout")
        if fault.name == "none":
            run.started = run.ended = sender.last_ack
        if run.started is not None and run.ended is not None:
            row.fault_s = run.ended - run.started
        row.detail = run.detail
        since = max(run.ended or sender.last_ack, sender.last_ack)

        def settled() -> bool:
            _, results, _ = tail.snapshot()
            for study in studies:
                acked = sender.acked.get(study.study_uid, set())
                mine = [r for r in results if r.StudyInstanceUID == study.study_uid]
                if not _complete(mine, acked):
                    return False
            return total_lag(stack.bootstrap_servers) == 0

        try:
            wait_for(settled, settle_timeout_s, "every study scored and no consumer lag", 0.5)
            row.recover_s = max(time.monotonic() - since, 0.0)
        except AssertionError as exc:
            row.problems.append(str(exc))
        # A little longer, so that a late duplicate (a redelivery) would be seen too.
        threading.Event().wait(config.quiet_period_s + 3.0)
        _count(stack, studies, sender, tail, row)
    finally:
        sender.stop()
        tail.close()
    return row


def _count(stack: Stack, studies: Sequence[Study], sender: Sender, tail: Tail, row: Row) -> None:
    store = stack.config.var / "store"
    events, results, row.dead_letters = tail.snapshot()
    row.acked = sender.acked_count
    row.resent = sender.resent
    row.associations = sender.associations
    row.refused = sum(sender.refused.values())
    row.unacknowledged = sender.unacknowledged
    row.events = len(events)
    row.distinct = len({e.SOPInstanceUID for e in events})
    for study in studies:
        acked = sender.acked.get(study.study_uid, set())
        stored = stored_sops(store, study.study_uid) & acked
        evented = {e.SOPInstanceUID for e in events if e.StudyInstanceUID == study.study_uid}
        mine = [r for r in results if r.StudyInstanceUID == study.study_uid]
        complete = _complete(mine, acked)
        scored_n = max((r.slice_count for r in mine), default=0)
        try:
            found = observations(stack, study.patient_id)
        except httpx.HTTPError as exc:
            row.problems.append(f"FHIR read failed: {exc!r}")
            found = []
        row.stored += len(stored)
        row.scored += bool(complete)
        row.observations += len(found)
        row.obs_versions += sum(int(o.get("meta", {}).get("versionId", 1)) for o in found)
        missing = [
            len(acked - stored),
            len(acked - evented),
            max(len(acked) - scored_n, 0),
            len(acked) if not found else 0,
        ]
        row.lost += max(missing)
        per_key = Counter((o.get("identifier") or [{}])[0].get("value", o["id"]) for o in found)
        row.duplicated += sum(n - 1 for n in per_key.values() if n > 1)
        for observation in found:
            try:
                reissued = unchanged_versions(stack, observation)
            except httpx.HTTPError as exc:
                row.problems.append(f"FHIR history read failed: {exc!r}")
                continue
            row.reissued += len(reissued)
            row.duplicated += len(reissued)
            for changed in reissued:
                row.problems.append(
                    f"Observation/{observation['id']} rewritten with the same result "
                    f"(changed: {', '.join(sorted(changed)) or 'nothing'})"
                )
        row.rescored += max(len(complete) - 1, 0)
        row.partial += len(mine) - len(complete)
        if complete:
            first = [round(p, 6) for p in complete[0].probabilities]
            row.duplicated += sum(
                1 for r in complete[1:] if [round(p, 6) for p in r.probabilities] != first
            )
    if row.lost or row.duplicated:
        row.problems.append(f"{row.lost} lost, {row.duplicated} duplicated")


# --- the store on a filesystem of its own --------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """Mount a ``size_mb`` tmpfs on ``folder`` (root only) for as long as the ``with`` lasts:
    the store's own small disk, which the disk-full fault fills."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        # Lazily: a service still holding a file open must not keep the mount (or the test) up.
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    return os.geteuid() == 0 and shutil.which("mount") is not None
