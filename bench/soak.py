"""The soak (issue 19, point 3): the whole stack under a steady, hospital-like load for
``--minutes``, every service's memory (PSS, and RSS), open file descriptors and threads
sampled throughout, the broker JVM's heap after a full collection, the listener's outbox depth
and the pipeline's consumer lag. The bar: no growth beyond the first five minutes' range.

Starts the whole development stack as ``scanwatch run`` does (Kafka, the model server, the
FHIR API on a real PostgreSQL, the inference workers, the listener, the Rasa server and its
action server, the portal, the console, the training worker), seeds a few patients' records
(``devtools.chatbot_records``) and activates their portal accounts, then warms up what fills
to a high-water mark once and stays there, which would otherwise look like growth whenever it
happened to be reached: every connection the FHIR API's pools keep (a burst of concurrent
searches) and the worker's scoring at its concurrency (``--warm-studies`` studies sent at
once, ready together). Then, at once:

- **studies**: one study of ``--instances`` MR slices every ``--study-every-s`` seconds, sent
  with dcmtk ``storescu`` by ``devtools.faults.Sender`` (one association per study, each study
  its own patient); every result read back off ``inference.result.v1``;
- **EHR**: ``--fhir-per-s`` FHIR searches a second by a backend client (a system token): the
  Observations, DiagnosticReports and ImagingStudies of a recently sent study's patient, and
  the anomaly-score Observations of the last day;
- **chat**: ``--chat-patients`` patients each sending a result question every
  ``--chat-every-s`` seconds through the chatbot's authenticated channel (their own tokens), in
  visits of ``--chat-visit-questions`` questions, each visit a new conversation session (as a
  patient back after the session expired: ``/session_start``). One endless session would grow
  the conversation that every action call carries, message after message, and with it the
  action server's memory: a patient who never stops typing, not a hospital's load;
- **portal**: ``--portal-patients`` patients, signed in over HTTP as a browser would, each
  opening the results page (or the care page, every third view) every ``--portal-every-s``
  seconds (no browser: its work is on the patient's device, not on the server).

Every ``--interval`` seconds: per service (the process, its process group and descendants),
PSS and RSS, open fds, threads, processes and CPU time; the broker JVM's heap after its
latest collection, after its latest full collection (forced every ``--full-gc-every-s`` with
the JDK's ``jcmd``) and its committed heap (its GC log); the listener's outbox depth (its
``scanwatch_listener_outbox_depth`` gauge); each consumer group's lag; each request kind's
p95 over the interval. After ``--minutes`` the load stops and the pipeline drains (bounded),
every study is counted, and ``bench/soak.md`` (the table and the verdict), ``bench/soak.png``
(a panel per metric, a line per service) and ``bench/soak.csv`` (every sample) are written.

    .venv/bin/python bench/soak.py                                   # the soak: 30 minutes
    .venv/bin/python bench/soak.py --minutes 4 --warmup-minutes 1 --judge-minutes 1  # smoke

The rule (also written into the report): for each service and metric, the first
``--warmup-minutes`` of load give the baseline range [min, max]; the metric passes when the
median of the last ``--judge-minutes`` is at most that max plus a tolerance (memory: 2 % of the
max or 4 MiB, whichever is larger; fds and threads: 2; processes, outbox depth, lag: 0). The
median, not the max, so that one burst (a study arriving, a collection) does not fail it and
a level that crept up does. Memory is judged as PSS, which counts a page that a service's
processes share once (summed RSS counts PostgreSQL's shared buffers once per backend);
PostgreSQL as its PSS less its shared memory (its buffer cache fills as the database grows, up
to ``shared_buffers``); the broker as its heap after a full collection (its RSS grows as the
JVM first touches the heap it committed, and its heap after a young collection as garbage
collects in old regions until a marking cycle). RSS is shown, not judged. The worker keeps a
scored study for ``--study-retention-s`` (a week in production): within a soak that long, its
table would grow by design, study by study, and hide a leak; shortened, the table is at its
steady size within the warm-up. Exits non-zero when the bar or the counts fail.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools import chatbot_records, process_stats  # noqa: E402
from devtools.benchmarks import commit, percentile, say  # noqa: E402
from devtools.faults import Sender, Study, Tail, build_studies, listener_metric  # noqa: E402
from devtools.kafka_local import free_port  # noqa: E402
from devtools.patients import RESULT_QUESTIONS, activate, ask, portal_session  # noqa: E402
from devtools.postgres_local import LocalPostgres  # noqa: E402
from devtools.stack import Ports, Stack, StackConfig, StackError  # noqa: E402
from devtools.testing import wait_for  # noqa: E402
from scanwatch import ids  # noqa: E402
from scanwatch.fhir_codes import ANOMALY_SCORE_CODE, CODE_SYSTEM  # noqa: E402
from services.console.pipeline import consumer_lag  # noqa: E402

KAFKA_LIBS = ROOT / "var" / "kafka" / "libs"
CHAT_MODELS = ROOT / "var" / "chatbot" / "models"
OUT = ROOT / "bench" / "soak"
MIB = 2**20
#: The listener's gauge of events in its durable outbox not yet acknowledged by Kafka.
OUTBOX_METRIC = "scanwatch_listener_outbox_depth"
#: Per metric: (relative, absolute) tolerance above the warm-up window's max.
TOLERANCE = {
    "pss_mib": (0.02, 4.0),
    "pss_private_mib": (0.02, 4.0),
    "rss_mib": (0.02, 4.0),
    "heap_after_gc_mib": (0.02, 4.0),
    "heap_after_full_gc_mib": (0.02, 4.0),
    "fds": (0.0, 2.0),
    "threads": (0.0, 2.0),
    "processes": (0.0, 0.0),
    "outbox_depth": (0.0, 0.0),
    "consumer_lag": (0.0, 0.0),
}
JUDGED = (
    "pss_mib",
    "pss_private_mib",
    "rss_mib",
    "heap_after_gc_mib",
    "heap_after_full_gc_mib",
    "fds",
    "threads",
    "processes",
)
PIPELINE = "pipeline"
POSTGRES = "postgresql"
#: Why a metric is shown but not judged: a short tag for the table and the reason.
SHARED_PAGES = (
    "shared pages",
    "RSS counts a page that a service's processes share once per process (PostgreSQL's "
    "shared buffers once per backend that touched them); PSS is judged",
)
JVM_HEAP = (
    "JVM heap",
    "the JVM's resident memory grows as its heap fills up to the committed size before "
    "collections reuse it; the heap after a full collection is judged",
)
YOUNG_GC = (
    "young collections",
    "G1's young collections leave the garbage of old regions in place until a marking cycle "
    "starts at 45 % of the heap, so the heap after them creeps up with nothing leaked (the "
    "45-minute soak of 2026-12-06: 176 → 233 MiB); the heap after a full collection is judged",
)
SHARED_BUFFERS = (
    "shared buffers",
    "PostgreSQL's buffer cache is shared memory that fills with the pages the queries touch as "
    "the FHIR database grows by every study, up to shared_buffers (128 MiB, the initdb "
    "default): a ceiling set by configuration, not a leak; its PSS less that shared memory "
    "(pss_private_mib: the backends' own memory and the files they map) is judged",
)
#: The metrics shown but not judged, by (service, metric); service "*": every service.
NOT_JUDGED = {
    ("*", "rss_mib"): SHARED_PAGES,
    (POSTGRES, "pss_mib"): SHARED_BUFFERS,
    ("kafka", "rss_mib"): JVM_HEAP,
    ("kafka", "pss_mib"): JVM_HEAP,
    ("kafka", "heap_after_gc_mib"): YOUNG_GC,
}
#: The broker's service name, and its JVM's heap metrics (from its GC log).
KAFKA = "kafka"
HEAP_AFTER_GC = "heap_after_gc_mib"
HEAP_AFTER_FULL_GC = "heap_after_full_gc_mib"
HEAP_COMMITTED = "heap_committed_mib"


# --- counting --------------------------------------------------------------------------------


@dataclass
class Tally:
    """Requests of every kind: successes, errors (with the first few reasons), latencies."""

    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: list[tuple[float, str, float]] = field(default_factory=list)  # (t, kind, s)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, started: float, error: str | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            if error is None:
                self.ok[kind] += 1
                self.latencies.append((now, kind, now - started))
            else:
                self.errors[kind] += 1
                self.reasons[kind][error[:160]] += 1

    def since(self, t: float) -> dict[str, list[float]]:
        with self.lock:
            found: dict[str, list[float]] = defaultdict(list)
            for at, kind, seconds in reversed(self.latencies):
                if at < t:
                    break
                found[kind].append(seconds)
            return found


def paced(
    stop: threading.Event,
    every_s: float,
    action: Callable[[int], None],
    offset: float,
    tally: Tally,
    kind: str,
) -> None:
    """Call ``action(n)`` every ``every_s`` seconds until ``stop``; a late call does not make
    the next ones come faster (the rate is kept, never caught up in a burst). An exception
    is counted as an error of ``kind`` and the load goes on."""
    due = time.monotonic() + offset
    for n in itertools.count():
        if stop.wait(max(0.0, due - time.monotonic())):
            return
        started = time.monotonic()
        try:
            action(n)
        except Exception as exc:  # noqa: BLE001 - counted, shown in the report
            tally.record(kind, started, f"exception: {exc!r}")
        due = max(due + every_s, time.monotonic())


# --- the load --------------------------------------------------------------------------------


@dataclass
class Load:
    stack: Stack
    work: Path
    args: argparse.Namespace
    tally: Tally
    tail: Tail
    stop: threading.Event = field(default_factory=threading.Event)
    studies: list[Study] = field(default_factory=list)
    sender: Sender = field(init=False)

    def __post_init__(self) -> None:
        c = self.stack.config
        self.sender = Sender("127.0.0.1", c.ports.dicom, c.ae_title)

    def send_study(self, n: int) -> None:
        study = build_studies(self.work / "studies", f"SW-SOAK-{n:04d}", 1, self.args.instances)[0]
        self.tail.studies.add(study.study_uid)  # before it is sent: its events are kept
        started = time.monotonic()
        self.sender.send(study)
        self.studies.append(study)
        missing = len(study.sops) - len(self.sender.acked.get(study.study_uid, ()))
        self.tally.record("study", started, f"{missing} instances not acked" if missing else None)

    def fhir_search(self, n: int, client: httpx.Client) -> None:
        recent = self.studies[-10:]
        day = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        if n % 4 == 3 or not recent:
            path, params = "Observation", {"code": f"{CODE_SYSTEM}|{ANOMALY_SCORE_CODE}"}
            params |= {"date": f"ge{day}", "_count": "50"}
        else:
            patient = ids.patient_id(None, random.choice(recent).patient_id)
            path = ("Observation", "DiagnosticReport", "ImagingStudy")[n % 4]
            # ImagingStudy sorts by _id or _lastUpdated only
            newest = "-_lastUpdated" if path == "ImagingStudy" else "-date"
            params = {"patient": patient, "_sort": newest, "_count": "20"}
        if n % 200 == 0:  # tokens live 15 minutes
            client.headers.update(self.stack.fhir_headers())
        started = time.monotonic()
        try:
            answer = client.get(f"/{path}", params=params)
            error = None if answer.status_code == 200 else f"HTTP {answer.status_code} {path}"
            if error is not None:
                error += f": {answer.text[:120]}"
        except httpx.HTTPError as exc:
            error = repr(exc)
        self.tally.record("fhir", started, error)

    def fill_pools(self, clients: int, searches: int) -> None:
        """``clients`` EHR clients at once, ``searches`` searches each: every FHIR API process
        then has more requests in flight than its pool keeps connections, and the pool keeps
        all it may (``scanwatch.database.PG_POOL_SIZE``). Before the load starts: a pool that
        reached a new high only when requests happened to coincide an hour in would show as
        PostgreSQL growing a backend, bounded as the pools are."""
        day = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        params = {"code": f"{CODE_SYSTEM}|{ANOMALY_SCORE_CODE}", "date": f"ge{day}"}
        headers = self.stack.fhir_headers()
        go = threading.Barrier(clients)

        def client() -> None:
            with httpx.Client(
                base_url=self.stack.config.fhir_base, headers=headers, timeout=60
            ) as http:
                go.wait()
                for _ in range(searches):
                    started = time.monotonic()
                    try:
                        answer = http.get("/Observation", params=params)
                        error = None if answer.status_code == 200 else f"HTTP {answer.status_code}"
                    except httpx.HTTPError as exc:
                        error = repr(exc)
                    self.tally.record("pool-fill", started, error)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def send_at_once(self, count: int) -> None:
        """``count`` studies sent together (one association each), so that they are ready,
        and scored, at the same time: the worker's memory reaches its high-water mark, bounded
        by its scoring concurrency, before the load instead of the first time two studies
        happen to coincide (the soak of 2026-12-06 06:05: +25 MiB at minute 7, flat after)."""
        threads = [
            threading.Thread(target=self.send_study, args=(100_000 + n,)) for n in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def chat(self, n: int, client: httpx.Client, patient: str) -> None:
        visit = self.args.chat_visit_questions + 1  # the questions, then a new session
        new_visit = n % visit == visit - 1
        text = "/session_start" if new_visit else RESULT_QUESTIONS[n % len(RESULT_QUESTIONS)]
        started = time.monotonic()
        try:
            answer = ask(client, self.stack, patient, text)
            error = None
            if answer.status_code != 200:
                error = f"HTTP {answer.status_code}"
            elif not new_visit and "scan" not in answer.text:
                error = "a reply without the result"
        except httpx.HTTPError as exc:
            error = repr(exc)
        self.tally.record("chat", started, error)

    def portal_view(self, n: int, session: list[httpx.Client], username: str) -> None:
        path, marker = ("/care", "<h1") if n % 3 == 2 else ("/", "data-score=")
        started = time.monotonic()
        try:
            answer = session[0].get(path)
            if answer.status_code == 303:  # the session ended: sign in again, counted
                error = f"HTTP 303 to {answer.headers.get('location')} (signed in again)"
                session[0].close()
                session[0] = portal_session(self.stack.config.portal_url, username)
            elif answer.status_code != 200 or marker not in answer.text:
                error = f"HTTP {answer.status_code}" + (
                    "" if answer.status_code != 200 else ", no content"
                )
            else:
                error = None
        except (httpx.HTTPError, RuntimeError) as exc:
            error = repr(exc)
        self.tally.record("portal", started, error)

    def threads(self, chat_patients: list[str], portal_users: list[str]) -> list[threading.Thread]:
        a = self.args
        out = [
            threading.Thread(
                target=paced,
                args=(self.stop, a.study_every_s, self.send_study, 0.0, self.tally, "study"),
            )
        ]
        fhir = httpx.Client(base_url=self.stack.config.fhir_base, timeout=60)

        def ehr() -> None:
            with fhir:
                paced(
                    self.stop,
                    1 / a.fhir_per_s,
                    lambda n: self.fhir_search(n, fhir),
                    0.0,
                    self.tally,
                    "fhir",
                )

        out.append(threading.Thread(target=ehr))
        for index, patient in enumerate(chat_patients):

            def talk(patient: str = patient, index: int = index) -> None:
                with httpx.Client(timeout=60) as client:
                    offset = a.chat_every_s * index / len(chat_patients)
                    paced(
                        self.stop,
                        a.chat_every_s,
                        lambda n: self.chat(n, client, patient),
                        offset,
                        self.tally,
                        "chat",
                    )

            out.append(threading.Thread(target=talk))
        for index, username in enumerate(portal_users):

            def browse(username: str = username, index: int = index) -> None:
                started = time.monotonic()
                try:
                    session = [portal_session(self.stack.config.portal_url, username)]
                except (httpx.HTTPError, RuntimeError) as exc:
                    self.tally.record("portal", started, f"sign-in failed: {exc!r}")
                    return
                try:
                    offset = a.portal_every_s * index / len(portal_users)
                    paced(
                        self.stop,
                        a.portal_every_s,
                        lambda n: self.portal_view(n, session, username),
                        offset,
                        self.tally,
                        "portal",
                    )
                finally:
                    session[0].close()

            out.append(threading.Thread(target=browse))
        return out


# --- sampling --------------------------------------------------------------------------------


def postmaster_pid(postgres: LocalPostgres | None) -> int | None:
    if postgres is None:
        return None
    try:
        return int((postgres.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def service_roots(stack: Stack, postgres: LocalPostgres | None) -> dict[str, int | None]:
    """Every service process of the stack, by name: the broker, PostgreSQL's postmaster, and
    each supervised service (its process leads its own process group)."""
    roots: dict[str, int | None] = {"kafka": stack.kafka.pid()}
    if postgres is not None:
        roots[POSTGRES] = postmaster_pid(postgres)
    for service in stack.services:
        alive = service.process is not None and service.process.poll() is None
        roots[service.name] = service.process.pid if alive and service.process else None
    return roots


def lags(stack: Stack) -> dict[str, int] | None:
    try:
        found = consumer_lag(stack.bootstrap_servers, timeout=10)
    except Exception:  # noqa: BLE001 - recorded as a gap, not a zero
        return None
    per_group: dict[str, int] = defaultdict(int)
    for lag in found:
        per_group[lag.group] += lag.lag
    return dict(per_group)


@dataclass
class Sample:
    t_s: float  # since the load started
    service: str
    metric: str
    value: float


def broker_heap(gc_log: Path, t: float) -> list[Sample]:
    """The broker JVM's heap as its GC log last stated it: used after the latest collection
    pause and after the latest full one (what the collector could not free however hard it
    tried: the measure of a leak, where the RSS of a JVM mostly shows its heap being committed)
    and committed, with the pauses so far. None before the first pause, or with a broker that
    is not this stack's."""
    try:
        pauses = process_stats.gc_pauses(gc_log.read_text(errors="replace"))
    except OSError:
        return []
    if not pauses:
        return []
    last = pauses[-1]
    full = [p for p in pauses if p.kind.startswith("Pause Full")]
    return [
        *([Sample(t, KAFKA, HEAP_AFTER_FULL_GC, full[-1].after_bytes / MIB)] if full else []),
        Sample(t, KAFKA, HEAP_AFTER_GC, last.after_bytes / MIB),
        Sample(t, KAFKA, HEAP_COMMITTED, last.committed_bytes / MIB),
        Sample(t, KAFKA, "gc_pauses", len(pauses)),
        Sample(t, KAFKA, "gc_full_pauses", len(full)),
        Sample(
            t,
            KAFKA,
            "gc_mixed_pauses",
            sum(p.kind.startswith("Pause Young (Mixed)") for p in pauses),
        ),
    ]


def collect_broker_heap(pid: int | None) -> str | None:
    """Have the broker's JVM collect its whole heap now (``jcmd <pid> GC.run``: a
    ``System.gc()``, a full pause in G1), so that the next sample's heap after a full
    collection is what the broker still holds. The reason it could not, or None."""
    if pid is None:
        return "the broker is not running"
    try:
        done = subprocess.run(
            ["jcmd", str(pid), "GC.run"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return repr(exc)
    return None if done.returncode == 0 else (done.stdout + done.stderr).strip()[:200]


def postgres_backends(postgres: LocalPostgres | None) -> int | None:
    """PostgreSQL's processes (the postmaster, its helpers, a backend per connection)."""
    root = postmaster_pid(postgres)
    used = process_stats.usage(process_stats.snapshot(), root) if root else None
    return None if used is None else used.processes


def sample(
    stack: Stack, postgres: LocalPostgres | None, tally: Tally, t0: float, since: float
) -> list[Sample]:
    now = time.monotonic()
    t = now - t0
    procs = process_stats.snapshot()
    rows: list[Sample] = []
    for name, root in service_roots(stack, postgres).items():
        used = process_stats.usage(procs, root)
        if used is None:
            continue
        rows += [
            Sample(t, name, "pss_mib", used.pss_bytes / MIB),
            Sample(t, name, "pss_shmem_mib", used.pss_shmem_bytes / MIB),  # in the CSV
            Sample(t, name, "rss_mib", used.rss_bytes / MIB),
            Sample(t, name, "fds", used.fds),
            Sample(t, name, "threads", used.threads),
            Sample(t, name, "processes", used.processes),
            Sample(t, name, "cpu_s", used.cpu_s),
        ]
        if name == POSTGRES:
            private = (used.pss_bytes - used.pss_shmem_bytes) / MIB
            rows.append(Sample(t, name, "pss_private_mib", private))
    rows += broker_heap(stack.kafka.gc_log, t)
    if (depth := listener_metric(stack, OUTBOX_METRIC)) is not None:
        rows.append(Sample(t, PIPELINE, "outbox_depth", depth))
    if (per_group := lags(stack)) is not None:
        rows.append(Sample(t, PIPELINE, "consumer_lag", sum(per_group.values())))
        rows += [Sample(t, f"lag:{g}", "consumer_lag", v) for g, v in per_group.items()]
    for kind, seconds in tally.since(since).items():
        rows.append(Sample(t, kind, "p95_ms", percentile(seconds, 95) * 1000))
    rows.append(Sample(t, "machine", "load1", os.getloadavg()[0]))
    return rows


# --- judging ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    service: str
    metric: str
    first: tuple[float, float] | None  # warm-up window's [min, max]
    after_max: float | None
    judged: float | None  # median of the judge window
    limit: float | None
    passed: bool | None  # None: not enough samples, or not judged
    #: Why the metric is shown but does not count for the bar (None: it counts).
    not_judged: tuple[str, str] | None = None  # (tag, reason)


def not_judged(service: str, metric: str) -> tuple[str, str] | None:
    """Why ``service``'s ``metric`` is shown but not judged (:data:`NOT_JUDGED`: a tag and
    the reason), or None."""
    return NOT_JUDGED.get((service, metric)) or NOT_JUDGED.get(("*", metric))


def judge(samples: list[Sample], warmup_s: float, judge_from_s: float) -> list[Verdict]:
    """Every judged (and shown) metric of every service: the warm-up window's range, the
    judge window's median and the limit; a metric :func:`not_judged` names has ``passed``
    None and its reason, whatever its values."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for s in samples:
        if s.metric in JUDGED or s.service == PIPELINE:
            series[(s.service, s.metric)].append((s.t_s, s.value))
    verdicts = []
    for (service, metric), points in sorted(series.items()):
        first = [v for t, v in points if t < warmup_s]
        after = [v for t, v in points if t >= warmup_s]
        last = [v for t, v in points if t >= judge_from_s]
        reason = not_judged(service, metric)
        if not first or not last:
            verdicts.append(Verdict(service, metric, None, None, None, None, None, reason))
            continue
        relative, absolute = TOLERANCE[metric]
        limit = max(first) + max(relative * max(first), absolute)
        judged = statistics.median(last)
        verdicts.append(
            Verdict(
                service,
                metric,
                (min(first), max(first)),
                max(after) if after else None,
                judged,
                limit,
                None if reason else judged <= limit,
                reason,
            )
        )
    return verdicts


def bar_passed(verdicts: list[Verdict]) -> bool:
    """The bar: every judged metric passed (one without samples fails it: not measured is not
    shown to be flat)."""
    return all(v.passed for v in verdicts if v.not_judged is None)


def cpu_share(samples: list[Sample], warmup_s: float) -> dict[str, float]:
    """Each service's CPU after the warm-up, in cores (1.0: one core busy all the time)."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in samples:
        if s.metric == "cpu_s" and s.t_s >= warmup_s:
            points[s.service].append((s.t_s, s.value))
    return {
        name: (p[-1][1] - p[0][1]) / (p[-1][0] - p[0][0])
        for name, p in points.items()
        if len(p) > 1 and p[-1][0] > p[0][0] and p[-1][1] >= p[0][1]
    }


# --- the report ------------------------------------------------------------------------------


def broker_gc_summary(samples: list[Sample], warmup_s: float) -> str:
    """One sentence on the broker's collections: pauses, full and mixed ones, the committed
    heap and the heap after the latest and the latest full collection at the end of the
    warm-up and at the end."""
    last: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in samples:
        if s.service == KAFKA and s.metric in (
            HEAP_AFTER_GC,
            HEAP_AFTER_FULL_GC,
            HEAP_COMMITTED,
            "gc_pauses",
            "gc_full_pauses",
            "gc_mixed_pauses",
        ):
            last[s.metric].append((s.t_s, s.value))
    if not last[HEAP_AFTER_GC] or not last[HEAP_AFTER_FULL_GC]:
        return "No (full) collection pause was logged: the broker's heap has no samples."

    def at_warmup(metric: str) -> float:
        points = last[metric]
        return next((v for t, v in reversed(points) if t < warmup_s), points[0][1])

    return (
        f"Its collections since it started: {last['gc_pauses'][-1][1]:.0f} pauses "
        f"({last['gc_mixed_pauses'][-1][1]:.0f} mixed, {last['gc_full_pauses'][-1][1]:.0f} "
        f"full); heap committed {fmt(at_warmup(HEAP_COMMITTED))} MiB at the end of the warm-up "
        f"and {fmt(last[HEAP_COMMITTED][-1][1])} MiB at the end; heap after a full collection "
        f"{fmt(at_warmup(HEAP_AFTER_FULL_GC))} and {fmt(last[HEAP_AFTER_FULL_GC][-1][1])} MiB, "
        f"after the latest collection {fmt(at_warmup(HEAP_AFTER_GC))} and "
        f"{fmt(last[HEAP_AFTER_GC][-1][1])} MiB."
    )


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.1f}"


def plotted_as(sample: Sample) -> str | None:
    """The metric a sample is drawn as: PostgreSQL's judged ``pss_private_mib`` in the PSS
    panel, in place of its whole PSS (not drawn)."""
    if sample.service == POSTGRES and sample.metric == "pss_mib":
        return None
    if sample.service == POSTGRES and sample.metric == "pss_private_mib":
        return "pss_mib"
    return sample.metric


def write_csv(path: Path, samples: list[Sample]) -> None:
    with path.open("w", newline="") as fp:
        out = csv.writer(fp)
        out.writerow(["t_s", "service", "metric", "value"])
        for s in samples:
            out.writerow([f"{s.t_s:.1f}", s.service, s.metric, f"{s.value:.3f}"])


def plot(path: Path, samples: list[Sample], warmup_s: float, judge_from_s: float) -> None:
    """A panel per metric, a line per service. Memory, fds and threads are drawn as the
    change from the service's own warm-up median (their levels differ 100-fold: on one axis
    a leak would be a flat line); their levels are in the table and the CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            ("pss_mib",),
            "PSS (judged; PostgreSQL's less its shared buffers): change from the warm-up "
            "median (MiB)",
            True,
            False,
        ),
        (("rss_mib",), "RSS (not judged): change from the warm-up median (MiB)", True, False),
        (
            (HEAP_AFTER_FULL_GC, HEAP_AFTER_GC, HEAP_COMMITTED),
            "broker JVM heap (MiB): after the latest full GC (judged), after the latest GC, "
            "committed",
            False,
            False,
        ),
        (("fds",), "open file descriptors: change from the warm-up median", True, False),
        (("threads",), "threads: change from the warm-up median", True, False),
        (("outbox_depth",), "listener outbox depth (events)", False, False),
        (("consumer_lag",), "consumer lag (records): total and per group", False, False),
        (
            ("p95_ms",),
            "p95 per sampling interval, ms (study: a whole study by storescu)",
            False,
            True,
        ),
    ]
    names = sorted({s.service for s in samples if s.metric in ("pss_mib", "p95_ms")})
    names += sorted({s.service for s in samples if s.service.startswith("lag:")})
    colours = plt.get_cmap("tab10").colors
    styles = {
        name: {"color": colours[i % 10], "linestyle": ("-", "--", ":")[i // 10 % 3]}
        for i, name in enumerate(names)
    }
    styles[PIPELINE] = {"color": "black", "linewidth": 2.2}
    styles[f"{KAFKA} {HEAP_AFTER_FULL_GC}"] = styles.get(KAFKA, {}) | {"linewidth": 2.4}
    styles[f"{KAFKA} {HEAP_AFTER_GC}"] = styles.get(KAFKA, {}) | {"linestyle": "--"}
    styles[f"{KAFKA} {HEAP_COMMITTED}"] = styles.get(KAFKA, {}) | {"linestyle": ":"}
    fig, axes = plt.subplots(4, 2, figsize=(16, 18), sharex=True)
    for ax, (metrics, title, relative, log) in zip(axes.flat, panels, strict=True):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for s in samples:
            if plotted_as(s) in metrics:
                name = s.service if len(metrics) == 1 else f"{s.service} {s.metric}"
                lines[name].append((s.t_s, s.value))
        for name, points in sorted(lines.items()):
            base = 0.0
            if relative:
                first = [v for t, v in points if t < warmup_s] or [points[0][1]]
                base = statistics.median(first)
            xs = [t / 60 for t, _ in points]
            ys = [v - base for _, v in points]
            ax.plot(xs, ys, label=name, **styles.get(name, {}))
        ax.axvspan(0, warmup_s / 60, color="0.9", zorder=0)
        ax.axvline(judge_from_s / 60, color="0.4", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=11)
        if log and lines:
            ax.set_yscale("log")
        if HEAP_AFTER_FULL_GC in metrics and lines:
            ax.set_ylim(bottom=0)  # the heap's level against its size, not its wobble
        ax.grid(True, alpha=0.3)
        if not relative and lines:
            ax.legend(fontsize=8, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the load started")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=7, fontsize=9, frameon=False)
    fig.text(
        0.5,
        0.005,
        "grey: the warm-up window (the baseline range); dashed line: the judge window starts",
        ha="center",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.01, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


@dataclass
class Counts:
    studies_sent: int = 0
    instances_acked: int = 0
    instances_expected: int = 0
    studies_scored: int = 0
    partial_results: int = 0
    dead_letters: int = 0
    not_scored: list[str] = field(default_factory=list)
    drained_s: float | None = None


def count(load: Load, tail: Tail) -> Counts:
    _, results, dead = tail.snapshot()
    found = Counts(
        studies_sent=len(load.studies),
        instances_acked=load.sender.acked_count,
        instances_expected=sum(len(s.sops) for s in load.studies),
        dead_letters=dead,
    )
    for study in load.studies:
        acked = load.sender.acked.get(study.study_uid, set())
        mine = [r for r in results if r.StudyInstanceUID == study.study_uid]
        complete = [r for r in mine if r.slice_count >= len(acked)]
        found.partial_results += len(mine) - len(complete)
        if complete:
            found.studies_scored += 1
        else:
            found.not_scored.append(study.patient_id)
    return found


def report(
    args: argparse.Namespace,
    started: str,
    revision: str,
    load_before: str,
    samples: list[Sample],
    verdicts: list[Verdict],
    counts: Counts,
    tally: Tally,
    restarts: dict[str, int],
    load_s: float,
    pool_fill: tuple[int | None, int | None] | None,
) -> tuple[str, bool]:
    warmup_s, judge_from_s = args.warmup_minutes * 60, load_s - args.judge_minutes * 60
    full = args.minutes >= 30
    cpu = cpu_share(samples, warmup_s)
    bar = bar_passed(verdicts)
    judged = [v for v in verdicts if v.not_judged is None]
    errors = sum(tally.errors.values()) + counts.dead_letters + len(counts.not_scored)
    errors += counts.instances_expected - counts.instances_acked + sum(restarts.values())
    lines = [
        "# Soak (issue 19, point 3)" + ("" if full else " — SMOKE RUN, not the soak"),
        "",
        "```sh",
        (".venv/bin/python bench/soak.py " + shlex.join(sys.argv[1:])).strip(),
        "```",
        "",
        f"{started}, commit {revision}; machine: {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
        f"load average {load_before} at the start and "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (a machine shared with "
        "other engineers' runs).",
        "",
        f"Load for {load_s / 60:.1f} minutes"
        + ("" if full else f" (**shorter than the 30-minute soak: {args.minutes} minutes**)")
        + f": one study of {args.instances} MR instances every {args.study_every_s:g} s "
        f"({3600 / args.study_every_s:.0f} studies an hour, each its own patient, storescu); "
        f"{args.fhir_per_s:g} FHIR searches a second by an EHR client; "
        f"{args.chat_patients} patients each asking the chatbot every {args.chat_every_s:g} s, "
        f"in visits of {args.chat_visit_questions} questions (each visit a new session); "
        f"{args.portal_patients} patients each opening a portal page every "
        f"{args.portal_every_s:g} s. {args.workers} inference worker(s), quiet period "
        f"{args.quiet_period:g} s, scored studies kept {args.study_retention_s:g} s (a week in "
        "production: shortened so that the worker's table, which holds every study it keeps, is "
        "at its steady size within the warm-up and any growth left is a leak), the FHIR API on "
        f"{args.database}. Sampled every {args.interval:g} s."
        + (
            ""
            if pool_fill is None
            else f" Before the load, {args.pool_fill_clients} EHR clients searched at once "
            "(10 searches each) so that the FHIR API's connection pools opened what they keep: "
            f"PostgreSQL's processes {pool_fill[0]} before the burst, {pool_fill[1]} after (a "
            "pool reaching a new high later, when requests happened to coincide, showed as "
            "PostgreSQL growing a backend in the run of 2026-12-06 03:12, bounded as the pools "
            "are)."
        )
        + f" And {args.warm_studies} studies were sent at once and scored before the load "
        "(the worker scores two at a time: its memory's high-water mark, reached at minute 7 "
        "in the run of 2026-12-06 06:05 and flat after).",
        "",
        "## The bar: no growth beyond the first minutes' range",
        "",
        f"Rule: per service and metric, the samples of the first {args.warmup_minutes:g} "
        "minutes of load give the range [min, max]; the metric **passes** when the median of "
        f"the last {args.judge_minutes:g} minutes (from minute {judge_from_s / 60:.1f}) is at "
        "most that max plus a tolerance: memory 2 % of the max or 4 MiB, whichever is larger; "
        "fds and threads 2; processes, outbox depth and consumer lag 0. The median rather "
        "than the max, so that one burst does not fail a metric and a level that crept up "
        "does. "
        f"**{'PASS' if bar else 'FAIL'}**"
        + ("" if bar else f": {sum(not v.passed for v in judged)} of {len(judged)} metrics")
        + f" ({len(judged)} judged, {len(verdicts) - len(judged)} shown but not judged).",
        "",
        "Memory is judged as **PSS** (`pss_mib`: proportional set size, the `Pss:` line of "
        "`/proc/<pid>/smaps_rollup`, summed over the service's processes: its process group "
        "and descendants). RSS summed over processes counts a page several of them map once "
        "per process: PostgreSQL's shared buffers are mapped by every backend, and each "
        "backend's RSS grows as it touches more of them, so the sum grows with no memory "
        "allocated at all (the last 30-minute run failed PostgreSQL's RSS that way). PSS "
        "charges a shared page 1/n to each of its n sharers, so the sum counts it once. RSS "
        "stays in the table (not judged) and in the CSV. PostgreSQL is judged on its PSS less "
        "its shared memory (`pss_private_mib`, the `Pss_Shmem:` line taken off): its buffer "
        "cache fills with the database as every study adds to it, up to `shared_buffers` "
        "(128 MiB), a ceiling set by configuration (the 45-minute run of 2026-12-06 failed its "
        "PSS that way); its whole PSS is shown, not judged.",
        "",
        "The broker is judged on its JVM's **heap after a full collection** "
        "(`heap_after_full_gc_mib`: the soak has the JVM collect its whole heap every "
        f"{args.full_gc_every_s:g} s with `jcmd <pid> GC.run`, and reads the heap used after "
        "that pause from the broker's `-Xlog:gc` log, `devtools/kafka_local.py`): what stays "
        "is what the broker still holds. Not its RSS: a JVM's resident memory grows as the "
        "heap it has committed is first touched, until collections start reusing it. Not its "
        "heap after the latest (young) collection either: that creeps up with old garbage "
        "until a marking cycle (the run of 2026-12-06 03:12 failed it that way). "
        + broker_gc_summary(samples, warmup_s),
        "",
        "| service | metric | first minutes [min, max] | max after | last minutes median "
        "| limit | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for v in verdicts:
        first = "—" if v.first is None else f"[{fmt(v.first[0])}, {fmt(v.first[1])}]"
        verdict = (
            f"not judged ({v.not_judged[0]})"
            if v.not_judged
            else "no samples"
            if v.passed is None
            else "PASS"
            if v.passed
            else "**FAIL**"
        )
        lines.append(
            f"| {v.service} | {v.metric} | {first} | {fmt(v.after_max)} | {fmt(v.judged)} "
            f"| {fmt(v.limit)} | {verdict} |"
        )
    reasons_shown = sorted({v.not_judged for v in verdicts if v.not_judged})
    lines += ["", *(f"Not judged ({tag}): {reason}." for tag, reason in reasons_shown)]
    lines += [
        "",
        "CPU after the warm-up, in cores (2 on this machine): "
        + ", ".join(f"{n} {c:.2f}" for n, c in sorted(cpu.items(), key=lambda x: -x[1]))
        + ".",
        "",
        "## Counts",
        "",
        "| what | count |",
        "| --- | ---: |",
        f"| studies sent | {counts.studies_sent} |",
        f"| instances acknowledged / sent | {counts.instances_acked} / "
        f"{counts.instances_expected} |",
        f"| studies scored whole (`inference.result.v1`) | {counts.studies_scored} |",
        f"| studies not scored after the drain | {len(counts.not_scored)} |",
        f"| partial results (scored before the study was whole, then again) | "
        f"{counts.partial_results} |",
        f"| dead letters | {counts.dead_letters} |",
        "| pipeline drained after the load stopped | "
        + ("not within the timeout" if counts.drained_s is None else f"{counts.drained_s:.0f} s")
        + " |",
    ]
    for kind, label in (
        ("fhir", "FHIR searches"),
        ("chat", "chat replies"),
        ("portal", "portal views"),
    ):
        ok, bad = tally.ok[kind], tally.errors[kind]
        lat = [s for _, k, s in tally.latencies if k == kind]
        p = (
            f" (p50 {statistics.median(lat) * 1000:.0f} ms, "
            f"p95 {percentile(lat, 95) * 1000:.0f} ms)"
            if lat
            else ""
        )
        lines.append(f"| {label} ok{p} / errors | {ok} / {'**' + str(bad) + '**' if bad else 0} |")
    lines.append(
        f"| service restarts | {sum(restarts.values())}"
        + (
            f" ({', '.join(f'{n} {r}' for n, r in restarts.items() if r)})"
            if any(restarts.values())
            else ""
        )
        + " |"
    )
    reasons = [
        f"- {kind}: {n} × {reason}"
        for kind, found in tally.reasons.items()
        for reason, n in found.most_common(5)
    ]
    if counts.not_scored:
        reasons.append(f"- not scored: {', '.join(counts.not_scored[:10])}")
    lines += ["", *(["Errors:", *reasons] if reasons else ["No errors."]), ""]
    lines += [
        "Files: `soak.png` (a panel per metric, a line per service; the grey band is the "
        "warm-up window, the dashed line where the judge window starts), `soak.csv` (every "
        "sample: t_s, service, metric, value; `lag:<group>` rows per consumer group, "
        "`cpu_s` cumulative).",
        "",
    ]
    return "\n".join(lines), bar and errors == 0


# --- main --------------------------------------------------------------------------------------


def seed_patients(stack: Stack, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The chat and portal patients' records, and the portal patients' accounts."""
    c = stack.config
    codes = [f"SOAK-PATIENT-{n}" for n in range(max(args.chat_patients, args.portal_patients))]
    records = {
        code: chatbot_records.patient_records(
            code, "Soak^Patient", ((1, 14, 0.22), (3, 11, 0.41), (5, 20, 0.71))
        )
        for code in codes
    }
    system = stack.token("system/*.write")
    chatbot_records.seed(c.fhir_base, {"Authorization": f"Bearer {system}"}, records)
    auth = f"http://127.0.0.1:{c.ports.fhir}"
    usernames = []
    for n, code in enumerate(codes[: args.portal_patients]):
        usernames.append(f"soak-{n}")
        activate(auth, c.fhir_database, chatbot_records.patient_id(code), usernames[-1])
    chat = [chatbot_records.patient_id(code) for code in codes[: args.chat_patients]]
    return chat, usernames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="load duration")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="the baseline window")
    parser.add_argument("--judge-minutes", type=float, default=10.0, help="the judged window")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--study-every-s", type=float, default=30.0)
    parser.add_argument("--instances", type=int, default=38, help="instances per study")
    parser.add_argument("--fhir-per-s", type=float, default=2.0)
    parser.add_argument("--chat-patients", type=int, default=3)
    parser.add_argument("--chat-every-s", type=float, default=20.0)
    parser.add_argument(
        "--chat-visit-questions",
        type=int,
        default=6,
        help="questions a patient asks in one conversation session before the next begins",
    )
    parser.add_argument("--portal-patients", type=int, default=4)
    parser.add_argument("--portal-every-s", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--quiet-period", type=float, default=5.0)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument(
        "--full-gc-every-s",
        type=float,
        default=60.0,
        help="how often the broker's JVM is made to collect its whole heap (jcmd GC.run)",
    )
    parser.add_argument(
        "--study-retention-s",
        type=float,
        default=120.0,
        help="the worker keeps a scored study this long (production: a week; shortened so "
        "that its table is at its steady size within the warm-up)",
    )
    parser.add_argument(
        "--warm-studies",
        type=int,
        default=3,
        help="studies sent at once before the load (the worker scores 2 at a time by default)",
    )
    parser.add_argument(
        "--pool-fill-clients",
        type=int,
        default=48,
        help="concurrent EHR clients of the burst that opens the FHIR API's pools before the "
        "load (0: none)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=1200.0,
        help="seconds the stack may take to start (Rasa's two workers load the model slowly "
        "on a loaded machine: over 600 s at load average 9)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="writes <out>.md, .png, .csv")
    parser.add_argument(
        "--keep-logs",
        type=Path,
        help="copy the services' logs here at the end (they live in a temporary folder)",
    )
    args = parser.parse_args()
    if args.warmup_minutes + args.judge_minutes > args.minutes:
        parser.error("--warmup-minutes + --judge-minutes must fit in --minutes")
    if shutil.which("jcmd") is None:
        parser.error("jcmd (the JDK's, e.g. openjdk-17-jdk-headless) forces the broker's full GC")
    # SIGTERM (a timeout) unwinds like Ctrl-C: the stack and PostgreSQL are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    # Before anything is written: the CSV, written before the report, would mark it dirty.
    revision = commit()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from training.default_model import ensure_default_model

    samples: list[Sample] = []
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="scanwatch-soak-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # PostgreSQL runs as its own user (devtools.postgres_local)
        ensure_default_model(work / "models")
        postgres = None
        if args.database == "postgresql":
            (work / "pg").mkdir()
            postgres = LocalPostgres(work / "pg", free_port())
            postgres.start()
        try:
            config = StackConfig(
                var=work / "var",
                ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
                workers=args.workers,
                quiet_period_s=args.quiet_period,
                models=work / "models",
                kafka_libs=KAFKA_LIBS,
                chatbot=True,
                chat_models=CHAT_MODELS,
                fhir_database_url=postgres.database_url() if postgres else None,
                extra_env={"SCANWATCH_WORKER_STUDY_RETENTION_S": str(args.study_retention_s)},
            )
            stack = Stack(config)
            try:
                t_start = time.monotonic()
                say(f"starting the stack (logs: {stack.logs})")
                stack.start(timeout=args.start_timeout)
                say(f"stack healthy in {time.monotonic() - t_start:.0f} s; seeding patients")
                chat_patients, portal_users = seed_patients(stack, args)
                tail = Tail(stack.bootstrap_servers, set())
                load = Load(stack, work, args, tally, tail)
                pool_fill = None
                if args.pool_fill_clients:
                    before = postgres_backends(postgres)
                    load.fill_pools(args.pool_fill_clients, searches=10)
                    pool_fill = (before, postgres_backends(postgres))
                    say(f"PostgreSQL processes before and after the pools' burst: {pool_fill}")
                load.send_at_once(args.warm_studies)
                wait_for(
                    lambda: not count(load, tail).not_scored,
                    args.drain_timeout,
                    "the warm-up studies scored",
                )
                try:
                    threads = load.threads(chat_patients, portal_users)
                    t0 = time.monotonic()
                    for thread in threads:
                        thread.start()
                    end = t0 + args.minutes * 60
                    last = t0
                    collected = -math.inf
                    while True:
                        now = time.monotonic()
                        if now - collected >= args.full_gc_every_s:
                            collected = now
                            if (why := collect_broker_heap(stack.kafka.pid())) is not None:
                                say(f"the broker's full collection was refused: {why}")
                        rows = sample(stack, postgres, tally, t0, last)
                        samples += rows
                        last = now
                        pipeline = {
                            s.metric: s.value
                            for s in rows
                            if s.service == PIPELINE or s.service == "machine"
                        }
                        say(
                            f"{(now - t0) / 60:5.1f} min: studies {len(load.studies)}, "
                            f"ok/errors: fhir {tally.ok['fhir']}/{tally.errors['fhir']}, "
                            f"chat {tally.ok['chat']}/{tally.errors['chat']}, "
                            f"portal {tally.ok['portal']}/{tally.errors['portal']}; {pipeline}"
                        )
                        if (remaining := end - time.monotonic()) <= 0:
                            break
                        load.stop.wait(min(args.interval, remaining))
                    load_s = time.monotonic() - t0
                    load.stop.set()
                    for thread in threads:
                        thread.join(timeout=120)
                    say("load stopped; draining")
                    drained_at = time.monotonic()
                    counts = Counts()
                    while time.monotonic() - drained_at < args.drain_timeout:
                        counts = count(load, tail)
                        pipeline = lags(stack)
                        if (
                            not counts.not_scored
                            and pipeline is not None
                            and not sum(pipeline.values())
                        ):
                            counts.drained_s = time.monotonic() - drained_at
                            break
                        load.stop.wait(1.0)
                    counts = count(load, tail) if counts.drained_s is None else counts
                    restarts = {s.name: s.restarts for s in stack.services}
                finally:
                    load.stop.set()
                    tail.close()
            except StackError:
                for log in sorted(stack.logs.glob("*.log")):
                    sys.stderr.write(f"--- {log.name}\n{log.read_text()[-2000:]}\n")
                raise
            finally:
                stack.stop()
                if args.keep_logs is not None:  # the temporary folder goes with them
                    shutil.copytree(stack.logs, args.keep_logs, dirs_exist_ok=True)
                    say(f"the services' logs: {args.keep_logs}")
        finally:
            if postgres is not None:
                postgres.stop()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, png, table = (args.out.with_suffix(s) for s in (".md", ".png", ".csv"))
    write_csv(table, samples)  # first: an hour's samples are kept whatever fails after
    warmup_s = args.warmup_minutes * 60
    judge_from_s = load_s - args.judge_minutes * 60
    verdicts = judge(samples, warmup_s, judge_from_s)
    text, ok = report(
        args,
        started,
        revision,
        load_before,
        samples,
        verdicts,
        counts,
        tally,
        restarts,
        load_s,
        pool_fill,
    )
    md.write_text(text)
    plot(png, samples, warmup_s, judge_from_s)
    say(text)
    say(f"written: {md}, {png}, {table}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
