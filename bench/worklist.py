"""The console worklist's bar (issue 17): the first page shown p95 ≤ 300 ms with 10,000
studies.

1. A file store of ``--studies`` one-instance MR studies, written in the listener's layout
   (``<Study>/<Series>/<SOP>.dcm``, pydicom's MR_small relabelled), and the console's index
   built from it (one header read per file, timed and reported).
2. The FHIR API (tokens required) and the console, served on free ports; ``--scored`` of the
   studies carry an AI result in the worklist's result cache (as if read from FHIR before: the
   page still asks the FHIR API for what changed since, which is nothing: the steady state).
3. A signed-in clinician's session (its access token issued by the API's key set), then
   ``--rounds`` GETs of ``/worklist`` (the first page, 50 rows, server-rendered: the page is
   shown when its HTML has arrived), and of the page with a filter, timed from request to
   the last byte.

    .venv/bin/python bench/worklist.py --studies 10000 --scored 7000 --rounds 60
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.kafka_local import free_port  # noqa: E402
from devtools.testing import served  # noqa: E402
from scanwatch import ids  # noqa: E402
from services.auth.scopes import ROLE_SCOPES, parse_scopes  # noqa: E402
from services.auth.tokens import TokenService, load_key_set  # noqa: E402
from services.console.app import create_app as create_console  # noqa: E402
from services.console.config import Settings as ConsoleSettings  # noqa: E402
from services.console.worklist import results, study_keys  # noqa: E402
from services.fhir_api.app import create_app as create_fhir  # noqa: E402
from services.fhir_api.config import Settings as FhirSettings  # noqa: E402

ROOT_UID = "1.2.826.0.1.3680043.8.498.9"


def write_store(store: Path, n: int) -> list[str]:
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    uids = []
    for i in range(n):
        study = f"{ROOT_UID}.{i + 1}"
        series, sop = f"{study}.1", f"{study}.1.1"
        template.StudyInstanceUID, template.SeriesInstanceUID = study, series
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = sop
        template.PatientName = f"Bench^Patient{i:05d}"
        template.PatientID = f"B{i:05d}"
        template.StudyDate = f"2025{1 + i % 12:02d}{1 + i % 28:02d}"
        template.StudyTime = f"{i % 24:02d}{i % 60:02d}00"
        folder = store / study / series
        folder.mkdir(parents=True, exist_ok=True)
        template.save_as(folder / f"{sop}.dcm", enforce_file_format=True)
        uids.append(study)
    return uids


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(client: httpx.Client, url: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        answer = client.get(url)
        answer.read()
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, answer.text[:300]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--scored", type=int, default=7_000)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-worklist-") as tmp:
        var = Path(tmp)
        started = time.perf_counter()
        uids = write_store(var / "store", args.studies)
        say(f"store: {len(uids)} studies written in {time.perf_counter() - started:.1f} s")
        fhir_settings = FhirSettings(
            database_url=f"sqlite:///{var / 'fhir.db'}",
            auth_mode="required",
            signing_keys_file=var / "keys.json",
        )
        fhir_port, console_port = free_port(), free_port()
        with served(create_fhir(fhir_settings), fhir_port):
            base = f"http://127.0.0.1:{fhir_port}"
            settings = ConsoleSettings(
                port=console_port,
                storage_dir=var / "store",
                index_url=f"sqlite:///{var / 'index.db'}",
                audit_url=f"sqlite:///{var / 'audit.db'}",
                jwks_url=f"{base}/auth/jwks",
                fhir_base_url=f"{base}/fhir",
                client_id="bench-console",
                client_secret="bench-secret-not-used-for-sign-in",
                scan_interval_s=3600,
            )
            app = create_console(settings)
            console, web = app.state.console, app.state.web
            started = time.perf_counter()
            console.top_up()
            say(f"index: built in {time.perf_counter() - started:.1f} s")
            web.worklist.map_new_studies()
            rng = random.Random(17)
            rows = []
            for uid in rng.sample(uids, args.scored):
                score = rng.random()
                rows.append(
                    {
                        "imaging_id": ids.imaging_study_id(uid),
                        "observation_id": ids.observation_id(uid, "bench", 1),
                        "score": score,
                        "interpretation": "A" if score > 0.5 else "N",
                        "model": "bench v1",
                        "status": "final" if rng.random() < 0.2 else "preliminary",
                        "issued": "2025-06-01T12:00:00+00:00",
                    }
                )
            with web.worklist.engine.begin() as conn:
                conn.execute(results.insert(), rows)
            web.worklist.store_results([], "2025-06-01T12:00:00+00:00")
            with web.worklist.engine.connect() as conn:
                mapped = conn.execute(study_keys.select()).fetchall()
            say(f"worklist: {len(mapped)} studies, {len(rows)} with a result")
            tokens = TokenService(load_key_set(var / "keys.json"))
            account = "bench-clinician"
            access, lifetime = tokens.issue(
                account,
                parse_scopes(" ".join(ROLE_SCOPES["clinician"])),
                claims={"roles": ["clinician"]},
            )
            session = web.sessions.new()
            session.account, session.roles = account, ("clinician",)
            session.access_token, session.expires_at = access, time.monotonic() + lifetime
            with served(app, console_port):
                cookies = {settings.session_cookie: session.id}
                url = f"http://127.0.0.1:{console_port}/worklist"
                with httpx.Client(cookies=cookies, timeout=30) as client:
                    timed(client, url, 3)  # warm: templates compiled, pools open
                    for name, query in (
                        ("first page", ""),
                        ("abnormal, not reviewed", "?interpretation=A&reviewed=no"),
                        ("awaiting score", "?status=awaiting"),
                        ("a date range", "?from=2025-03-01&to=2025-03-31"),
                    ):
                        times = timed(client, url + query, args.rounds)
                        say(
                            f"{name:24s} n={len(times)}  p50 {statistics.median(times):6.1f} ms"
                            f"  p95 {percentile(times, 0.95):6.1f} ms"
                            f"  max {max(times):6.1f} ms"
                        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
