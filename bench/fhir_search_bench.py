"""Observation search latency of the FHIR API over PostgreSQL with a production-sized store.

What it does (issue 5, benchmark):

1. starts a throwaway PostgreSQL cluster (the one the API tests use, Debian ``postgresql``),
   creates the schema with the API's Alembic migrations;
2. loads ``--observations`` Observations (shaped like ``inference_worker.fhir_resources``
   writes them: same elements, codes and references) across ``--patients`` Patients with
   ``COPY`` straight into the store's tables. Every row is built by the store's own code
   (``search_values`` → ``version_row`` → ``index_rows``), so the indexed columns are exactly
   what the API's write path stores; the migration's secondary indexes are dropped for the load
   and recreated from their own definitions afterwards, then ``VACUUM ANALYZE``;
3. runs the API (``scanwatch-fhir-api serve``: uvicorn, real HTTP, auth off on loopback,
   read audit on as in production) and ``--clients`` concurrent clients issuing, alternately,
   ``Observation?patient=<random patient>&_sort=-date&_count=20`` and
   ``Observation?code=<anomaly score>&date=ge<random day>``;
4. times the SQL of the same queries directly (psycopg, the statements the store runs for them,
   compiled by the store) and prints ``EXPLAIN (ANALYZE, BUFFERS)`` of one of each.

Run: ``.venv/bin/python bench/fhir_search_bench.py`` (about 10 minutes on 2 cores);
``--observations 20000 --patients 1000`` for a quick smoke run; ``--workers N`` sets the API's
worker processes (default: the API's own, one per core up to 4 on PostgreSQL);
``--api-processes 2`` runs two separate APIs over the database. Results: ``bench/fhir.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.kafka_local import free_port  # noqa: E402
from scanwatch import ids  # noqa: E402
from scanwatch.database import make_engine  # noqa: E402
from services.fhir_api import migrate  # noqa: E402
from services.fhir_api.indexing import index_rows, search_values, version_row  # noqa: E402
from services.fhir_api.search import TOTAL_LIMIT, parse_search  # noqa: E402
from services.fhir_api.store import ResourceStore  # noqa: E402
from services.fhir_api.tests.conftest import LocalPostgres  # noqa: E402

CODE_SYSTEM = "urn:scanwatch:codesystem:mri-ai"
ANOMALY_SCORE = f"{CODE_SYSTEM}|anomaly-score"
#: Results span this many days before the newest one.
SPAN_DAYS = 730
NEWEST = datetime(2026, 10, 1, tzinfo=UTC)
MODELS = (("mri-anomaly", 1), ("mri-anomaly", 2), ("mri-anomaly", 3))
CLASSES = ("normal", "tumor", "infarct", "hemorrhage")
COPY_CHUNK_ROWS = 20_000
RV_COLUMNS = (
    "pk",
    "resource_type",
    "resource_id",
    "version_id",
    "last_updated",
    "is_current",
    "deleted",
    "subject_ref",
    "effective_start",
    "effective_end",
    "content",
)
TOKEN_COLUMNS = ("pk", "resource_pk", "resource_type", "param", "system", "code")
TABLES = ("resource_version", "search_token", "search_reference")


def log(message: str) -> None:
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


# --- Data ----------------------------------------------------------------------------------------


def patient_resource(number: int) -> dict[str, Any]:
    mrn = f"MRN{number:07d}"
    return {
        "resourceType": "Patient",
        "id": ids.patient_id("HOSP", mrn),
        "identifier": [{"system": "urn:scanwatch:patient-id:HOSP", "value": mrn}],
    }


def observation_resource(
    number: int, patient_id: str, effective: datetime, rng: random.Random
) -> dict[str, Any]:
    """An Observation with the elements ``inference_worker.fhir_resources.observation`` writes."""
    study_uid = f"1.2.826.0.1.3680043.10.999.{number}"
    model_name, model_version = MODELS[number % len(MODELS)]
    obs_id = ids.observation_id(study_uid, model_name, model_version)
    imaging = {"reference": f"ImagingStudy/{ids.imaging_study_id(study_uid)}"}
    probabilities = [rng.random() for _ in CLASSES]
    scale = sum(probabilities)
    probabilities = [p / scale for p in probabilities]
    score = 1.0 - probabilities[0]
    predicted = CLASSES[probabilities.index(max(probabilities))]
    abnormal = score > 0.5
    quantity = {"unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"}
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "meta": {
            "security": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "AIAST",
                    "display": "Artificial Intelligence asserted",
                }
            ]
        },
        "identifier": [{"system": ids.OBSERVATION_ID_SYSTEM, "value": obs_id}],
        "basedOn": [
            {
                "identifier": {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                            }
                        ]
                    },
                    "system": "urn:scanwatch:accession",
                    "value": f"ACC{number:08d}",
                }
            }
        ],
        "partOf": [imaging],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": CODE_SYSTEM, "code": "anomaly-score", "display": "MRI AI anomaly score"}
            ],
            "text": "AI anomaly score (MRI)",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective.isoformat(timespec="seconds"),
        "issued": (effective + timedelta(minutes=7)).isoformat(timespec="seconds"),
        "valueQuantity": {"value": round(score, 6), **quantity},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "A" if abnormal else "N",
                        "display": "Abnormal" if abnormal else "Normal",
                    }
                ]
            }
        ],
        "note": [
            {
                "text": f"AI-generated by model {model_name} v{model_version}; not reviewed by a "
                "clinician. Not for standalone diagnosis."
            }
        ],
        "device": {
            "reference": f"Device/{ids.device_id(model_name, model_version)}",
            "display": f"{model_name} v{model_version}",
        },
        "referenceRange": [
            {"high": {"value": 0.5, **quantity}, "text": "Model operating threshold 0.5"}
        ],
        "derivedFrom": [imaging],
        "component": [
            {
                "code": {
                    "coding": [
                        {
                            "system": "http://dicom.nema.org/resources/ontology/DCM",
                            "code": "121071",
                            "display": "Finding",
                        }
                    ],
                    "text": "Predicted class",
                },
                "valueCodeableConcept": {
                    "coding": [
                        {"system": "urn:scanwatch:codesystem:mri-ai-class", "code": predicted}
                    ],
                    "text": predicted,
                },
            },
            *(
                {
                    "code": {
                        "coding": [
                            {
                                "system": CODE_SYSTEM,
                                "code": f"p-{name}",
                                "display": f"Model probability: {name}",
                            }
                        ]
                    },
                    "valueQuantity": {"value": round(p, 6), **quantity},
                }
                for name, p in zip(CLASSES, probabilities, strict=True)
            ),
        ],
    }


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace('"', '""') + '"'


def _line(row: Any, columns: tuple[str, ...]) -> str:
    return ",".join(_csv(getattr(row, c)) for c in columns) + "\n"


class Loader:
    """Builds rows with the store's code and streams them into COPY."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self.connection = connection
        self.resource_pk = 0
        self.token_pk = 0
        self.rv_lines: list[str] = []
        self.token_lines: list[str] = []

    def add(self, resource: dict[str, Any], moment: datetime) -> None:
        values = search_values(resource)
        row = version_row(resource, 1, moment, values)
        self.resource_pk += 1
        row.pk = self.resource_pk
        self.rv_lines.append(_line(row, RV_COLUMNS))
        tokens, references = index_rows(row.resource_type, row.pk, values)
        assert not references  # Observations and Patients have none
        for token in tokens:
            self.token_pk += 1
            token.pk = self.token_pk
            self.token_lines.append(_line(token, TOKEN_COLUMNS))
        if len(self.rv_lines) >= COPY_CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        for table, columns, lines in (
            ("resource_version", RV_COLUMNS, self.rv_lines),
            ("search_token", TOKEN_COLUMNS, self.token_lines),
        ):
            if lines:
                with self.connection.cursor().copy(
                    f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
                ) as copy:
                    copy.write("".join(lines))
                lines.clear()
        self.connection.commit()


def load(dsn: str, observations: int, patients: int, seed: int) -> list[str]:
    """Fill the store; returns the Patient ids."""
    rng = random.Random(seed)
    with psycopg.connect(dsn) as connection:
        indexes = connection.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.tablename = ANY(%s) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
            (list(TABLES),),
        ).fetchall()
        constraints = connection.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE conrelid::regclass::text = ANY(%s) AND contype IN ('u', 'f') "
            "ORDER BY contype DESC",  # unique before foreign keys
            (list(TABLES),),
        ).fetchall()
        for table, name, _ in reversed(constraints):
            connection.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        connection.commit()
        log(f"dropped {len(indexes)} indexes and {len(constraints)} constraints for the load")

        loader = Loader(connection)
        started = time.perf_counter()
        moment0 = NEWEST - timedelta(days=SPAN_DAYS)
        patient_ids = []
        for number in range(patients):
            resource = patient_resource(number)
            patient_ids.append(resource["id"])
            loader.add(resource, moment0)
        for model_name, model_version in MODELS:
            device_id = ids.device_id(model_name, model_version)
            loader.add(
                {
                    "resourceType": "Device",
                    "id": device_id,
                    "identifier": [
                        {"system": ids.DEVICE_ID_SYSTEM, "value": f"{model_name}|{model_version}"}
                    ],
                    "status": "active",
                    "deviceName": [{"name": model_name, "type": "model-name"}],
                    "version": [{"value": str(model_version)}],
                },
                moment0,
            )
        # Results arrive in time order (last_updated follows effective), each for a random patient.
        offsets = sorted(rng.uniform(0, SPAN_DAYS * 86400) for _ in range(observations))
        for number, offset in enumerate(offsets):
            effective = (moment0 + timedelta(seconds=offset)).replace(microsecond=0)
            resource = observation_resource(number, rng.choice(patient_ids), effective, rng)
            loader.add(resource, effective + timedelta(minutes=7, seconds=rng.uniform(0, 60)))
            if number and number % 100_000 == 0:
                rate = number / (time.perf_counter() - started)
                log(f"  {number} Observations loaded ({rate:.0f}/s)")
        loader.flush()
        log(f"rows loaded in {time.perf_counter() - started:.0f} s; rebuilding indexes")
        started = time.perf_counter()
        connection.execute("SET maintenance_work_mem = '512MB'")
        for _name, definition in indexes:
            connection.execute(definition)
        for table, name, definition in constraints:
            connection.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for table, column in (("resource_version", "pk"), ("search_token", "pk")):
            connection.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"(SELECT max({column}) FROM {table}))"
            )
        connection.commit()
        log(f"indexes and constraints rebuilt in {time.perf_counter() - started:.0f} s")
        connection.autocommit = True
        started = time.perf_counter()
        connection.execute("VACUUM ANALYZE")
        log(f"VACUUM ANALYZE in {time.perf_counter() - started:.0f} s")
        sizes = connection.execute(
            "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
            "WHERE relname = ANY(%s)",
            (list(TABLES),),
        ).fetchall()
        log(f"table sizes (with indexes): {dict(sizes)}")
    return patient_ids


# --- Queries -------------------------------------------------------------------------------------


def patient_query(rng: random.Random, patient_ids: list[str]) -> str:
    return f"patient={rng.choice(patient_ids)}&_sort=-date&_count=20"


def code_date_query(rng: random.Random, _patient_ids: list[str]) -> str:
    day = (NEWEST - timedelta(days=rng.randrange(SPAN_DAYS))).date().isoformat()
    return f"code={ANOMALY_SCORE}&date=ge{day}"


QUERIES = {"patient&_sort=-date&_count=20": patient_query, "code&date=ge": code_date_query}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.50) * 1000, 2),
        "p95_ms": round(percentile(values, 0.95) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(values) * 1000, 2),
    }


class KeepAliveConnection:
    """One HTTP/1.1 keep-alive connection: requests written and responses read on asyncio
    streams, nothing else. An EHR's clients run on their own machines; here they share the 2
    cores with the API and PostgreSQL, so the load generator must cost as little as possible
    (httpx spent about 2.3 ms of CPU per request, more than the API's own search path)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: application/fhir+json\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in header_lines if line)
        )
        if "content-length" not in headers:
            raise RuntimeError(f"{path}: response without Content-Length: {headers}")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split(" ", 2)[1]), body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.reader = self.writer = None


async def http_load(
    bases: list[str], patient_ids: list[str], clients: int, per_client: int, seed: int
) -> tuple[dict[str, list[float]], float]:
    latencies: dict[str, list[float]] = {name: [] for name in QUERIES}
    names = list(QUERIES)

    async def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        host, port = bases[number % len(bases)].removeprefix("http://").rsplit(":", 1)
        connection = KeepAliveConnection(host, int(port))
        try:
            for i in range(per_client):
                name = names[(i + number) % len(names)]
                url = f"/fhir/Observation?{QUERIES[name](rng, patient_ids)}"
                start = time.perf_counter()
                status, body = await connection.get(url)
                elapsed = time.perf_counter() - start
                if status != 200:
                    raise RuntimeError(f"{url}: {status} {body[:300]!r}")
                # Every answer must look like a searchset Bundle; every tenth is parsed in
                # full (json.loads of a 60 kB page costs as much CPU as the API's search path).
                if not body.startswith(b'{"resourceType":"Bundle"') or (
                    name.startswith("patient") and b'"entry":[' not in body
                ):
                    raise RuntimeError(
                        f"{url}: not a searchset Bundle with entries: {body[:300]!r}"
                    )
                if i % 10 == 0:
                    bundle = json.loads(body)
                    if bundle["type"] != "searchset" or (
                        name.startswith("patient") and not bundle.get("entry")
                    ):
                        raise RuntimeError(f"{url}: unexpected Bundle: {body[:300]!r}")
                latencies[name].append(elapsed)
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies, time.perf_counter() - started


def cpu_seconds(api_pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of the API processes with their workers, of every
    ``postgres`` process, and of this load generator, from ``/proc``."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended
        pid = int(stat.parent.name)
        name, fields = (
            text[text.index("(") + 1 : text.rindex(")")],
            text[text.rindex(")") + 2 :].split(),
        )
        parents[pid], names[pid] = int(fields[1]), name
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick

    def under(pid: int, roots: set[int]) -> bool:
        while pid > 1:
            if pid in roots:
                return True
            pid = parents.get(pid, 0)
        return False

    roots = set(api_pids)
    own = os.times()
    return {
        "api": sum(t for pid, t in cpu.items() if under(pid, roots)),
        "postgresql": sum(t for pid, t in cpu.items() if names[pid] == "postgres"),
        "load_generator": own.user + own.system,
    }


def raw_sql(
    dsn: str, database_url: str, patient_ids: list[str], samples: int, seed: int
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Times the statements the store runs for each query (bounded count + page), one client."""
    engine = make_engine(database_url)
    store = ResourceStore(engine)
    dialect = engine.dialect
    rng = random.Random(seed)
    timings: dict[str, list[float]] = {name: [] for name in QUERIES}
    plans: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as connection:
        for name, make in QUERIES.items():
            for sample in range(samples):
                items = [tuple(p.split("=", 1)) for p in make(rng, patient_ids).split("&")]
                query = parse_search("Observation", items, 20, 200)  # type: ignore[arg-type]
                statements = [
                    s
                    for s in store.search_statements(
                        "Observation",
                        query.where,
                        query.order_by,
                        query.count,
                        query.offset,
                        TOTAL_LIMIT,
                    )
                    if s is not None
                ]
                sql = [
                    str(s.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
                    for s in statements
                ]
                start = time.perf_counter()
                for text in sql:
                    connection.execute(text).fetchall()
                timings[name].append(time.perf_counter() - start)
                if sample == 0:
                    plans[name] = "\n\n".join(
                        "\n".join(
                            r[0]
                            for r in connection.execute(
                                f"EXPLAIN (ANALYZE, BUFFERS) {text}"
                            ).fetchall()
                        )
                        for text in sql
                    )
    engine.dispose()
    return timings, plans


def serve(database_url: str, port: int, workers: int | None) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "SCANWATCH_FHIR_DATABASE_URL": database_url,
        "SCANWATCH_FHIR_AUTH_MODE": "off",
        "SCANWATCH_FHIR_HOST": "127.0.0.1",
        "SCANWATCH_FHIR_PORT": str(port),
        "SCANWATCH_FHIR_LOG_LEVEL": "WARNING",
    }
    if workers is not None:
        env["SCANWATCH_FHIR_WORKERS"] = str(workers)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.fhir_api", "serve"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("the API exited at start-up")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the API did not answer /healthz within 60 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=250)
    parser.add_argument("--sql-samples", type=int, default=200)
    parser.add_argument(
        "--api-processes",
        type=int,
        default=1,
        help="API processes over the same database; clients are spread over them",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes of each API (SCANWATCH_FHIR_WORKERS); default: the API's own",
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="scanwatch-pg-bench-"))
    cluster = LocalPostgres(root, free_port())
    cluster.start()
    apis: list[subprocess.Popen[bytes]] = []
    try:
        database_url = cluster.database_url()
        database = database_url.rsplit("/", 1)[1]
        dsn = f"host=127.0.0.1 port={cluster.port} user=postgres dbname={database}"
        engine = make_engine(database_url)
        migrate.upgrade(engine)
        engine.dispose()
        started = time.perf_counter()
        patient_ids = load(dsn, args.observations, args.patients, args.seed)
        build_s = time.perf_counter() - started
        log(f"dataset built in {build_s:.0f} s")

        bases = []
        for _ in range(args.api_processes):  # one after the other: the first one migrates
            port = free_port()
            apis.append(serve(database_url, port, args.workers))
            bases.append(f"http://127.0.0.1:{port}")
        log("warm-up")
        asyncio.run(http_load(bases, patient_ids, args.clients, 20, args.seed + 1))
        load_before = os.getloadavg()
        cpu_before = cpu_seconds([api.pid for api in apis])
        log(f"{args.clients} clients × {args.requests_per_client} requests")
        latencies, wall = asyncio.run(
            http_load(bases, patient_ids, args.clients, args.requests_per_client, args.seed + 2)
        )
        cpu_after = cpu_seconds([api.pid for api in apis])
        load_after = os.getloadavg()
        while apis:
            api = apis.pop()
            api.terminate()
            api.wait(timeout=30)
        log("raw SQL")
        timings, plans = raw_sql(dsn, database_url, patient_ids, args.sql_samples, args.seed + 3)
        requests = sum(len(v) for v in latencies.values())
        results = {
            "observations": args.observations,
            "patients": args.patients,
            "clients": args.clients,
            "api_processes": args.api_processes,
            "workers": args.workers,
            "dataset_build_s": round(build_s, 1),
            "http": {name: summary(values) for name, values in latencies.items()},
            "http_throughput_rps": round(requests / wall, 1),
            "cpu_ms_per_request": {
                party: round((cpu_after[party] - cpu_before[party]) * 1000 / requests, 2)
                for party in cpu_after
            },
            "sql_single_client": {name: summary(values) for name, values in timings.items()},
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "cpus": os.cpu_count(),
            "postgresql": str(cluster.bin),
        }
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
        for name, plan in plans.items():
            sys.stdout.write(f"\n--- EXPLAIN (ANALYZE, BUFFERS): {name}\n{plan}\n")
        if args.json:
            args.json.write_text(json.dumps(results | {"plans": plans}, indent=2))
    finally:
        for api in apis:  # SIGTERM first: the uvicorn parent stops its worker processes
            api.terminate()
            try:
                api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                api.kill()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
