"""The patient portal's bars (issue 16): the results list and the progress chart drawn, for
patients with 50 results each, in Chromium, with several patients signing in at once; and the
sign-in round trip (authorize, then token) of a SMART app.

1. The FHIR API (tokens required, its SMART authorization server) and the portal, as
   ``scanwatch run`` starts them, on free ports; ``--patients`` patients, each with
   ``--results`` scored studies as the worker writes them (one a month reviewed), a prescription
   and a visit; an account for each, activated through the activation page.
2. Sign-in round trip: ``--patients`` threads, each signing its patient in ``--rounds`` times
   as a SMART app does (Authlib's client, PKCE S256): open the authorization page, post the
   credentials (argon2id), take the code from the redirect, exchange it at the token
   endpoint. Timed from the first request to the token response.
3. Page: one Chromium (Debian's, headless), a browser context per patient. All patients sign
   in to the portal at once (timed from the click on "Sign in" to their results page with its
   chart drawn), then each opens the results page ``--rounds`` times: once the list holds
   every result and the chart one point per result, the time is read off the page's own
   clock, from navigation start to the ``results-drawn`` mark portal.js sets when chart.js has
   drawn the chart (the list, server-rendered, stands before it); also the page's first byte,
   and the time as the bench's client saw it (Playwright's polling and the Python side
   included).

    .venv/bin/python bench/portal.py --patients 8 --results 50 --rounds 10
    .venv/bin/python bench/portal.py --patients 8 --results 50 --rounds 10 --think-s 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from authlib.integrations.httpx_client import OAuth2Client
from playwright.async_api import Page, async_playwright, expect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools import chatbot_records  # noqa: E402
from devtools.benchmarks import percentile, say  # noqa: E402
from devtools.browser import form_fields, launch_options  # noqa: E402
from devtools.cli import dev_tokens  # noqa: E402
from devtools.kafka_local import free_port  # noqa: E402
from devtools.patients import PASSWORD, activate  # noqa: E402
from devtools.stack import Ports, Stack, StackConfig  # noqa: E402
from scanwatch.database import make_engine  # noqa: E402
from services.auth import clients  # noqa: E402
from services.auth.scopes import parse_scopes  # noqa: E402

BENCH_APP = "bench-smart-app"
BENCH_REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the code is read off the redirect
SCOPE = "launch/patient openid fhirUser offline_access patient/*.read"


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{name}: n={len(ms)} p50 {statistics.median(ms):.0f} ms, p95 {percentile(ms, 95):.0f} ms,"
        f" max {max(ms):.0f} ms"
    )


def studies(count: int) -> tuple[tuple[int, int, float], ...]:
    """``count`` (month, day, p(normal)) of 2025: up to five a month, scores that wander."""
    return tuple(
        (1 + n % 12, 1 + (n // 12) * 5, 0.15 + 0.7 * ((n * 37) % 100) / 100) for n in range(count)
    )


def sign_in_round_trip(auth: str, fhir: str, username: str) -> float:
    """One SMART sign-in over HTTP: authorization page, credentials, code, token."""
    client = OAuth2Client(
        client_id=BENCH_APP,
        token_endpoint_auth_method="none",
        redirect_uri=BENCH_REDIRECT,
        scope=SCOPE,
        code_challenge_method="S256",
    )
    verifier = secrets.token_urlsafe(48)
    url, _ = client.create_authorization_url(
        f"{auth}/auth/authorize", code_verifier=verifier, aud=fhir
    )
    started = time.perf_counter()
    with httpx.Client(base_url=auth, timeout=60) as browser:
        fields = form_fields(browser.get(url).text)
        fields.update(username=username, password=PASSWORD, totp="", action="sign-in")
        answer = browser.post("/auth/authorize", data=fields)
    if answer.status_code != 302:
        raise RuntimeError(f"sign-in refused: HTTP {answer.status_code}")
    token = client.fetch_token(
        f"{auth}/auth/token",
        authorization_response=answer.headers["location"],
        code_verifier=verifier,
    )
    elapsed = time.perf_counter() - started
    if "access_token" not in token or "patient" not in token:
        raise RuntimeError("the token response has no access token or patient")
    return elapsed


async def results_drawn(page: Page, results: int) -> None:
    await expect(page.get_by_role("list", name="Scans").get_by_role("listitem")).to_have_count(
        results, timeout=30_000
    )
    chart = page.locator("#progress-chart")
    await expect(chart).to_have_attribute("data-drawn", "true", timeout=30_000)
    await expect(chart).to_have_attribute("data-points", str(results), timeout=30_000)


def cpu_seconds() -> dict[int, tuple[int, float, str]]:
    """Every process's parent, CPU seconds so far (user + system) and name, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        found[int(entry.name)] = (int(fields[1]), cpu, head.split("(", 1)[1])
    return found


def tree(snapshot: dict[int, tuple[int, float, str]], root: int) -> list[int]:
    """``root`` and its descendants in ``snapshot``."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(child for child, (parent, *_) in snapshot.items() if parent == pid)
    return found


def chromium_kind(pid: int) -> str:
    """A Chromium process's kind (renderer, gpu-process, utility, browser): its own title,
    which Chromium rewrites into one space-separated string."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return "gone"
    found = re.search(r"--type=(\S+)", title)
    return found.group(1) if found else "browser"


def cpu_by_part(portal: int, api: int) -> dict[str, float]:
    """CPU seconds so far of the portal, the FHIR API, Chromium's processes by kind, and the
    bench's own driver (this process and Playwright's Node driver, which polls the page)."""
    snapshot = cpu_seconds()
    parts = dict.fromkeys(("portal", "FHIR API", "bench driver"), 0.0)
    services = {pid: "portal" for pid in tree(snapshot, portal)}
    services.update({pid: "FHIR API" for pid in tree(snapshot, api)})
    for pid in tree(snapshot, os.getpid()):
        _, cpu, name = snapshot[pid]
        part = services.get(pid)
        if part is None:
            part = f"Chromium {chromium_kind(pid)}" if "chrom" in name else "bench driver"
        parts[part] = parts.get(part, 0.0) + cpu
    return parts


async def browse(
    portal: str,
    usernames: list[str],
    results: int,
    rounds: int,
    think_s: float,
    pids: tuple[int, int],
    browsers: int,
) -> tuple:
    sign_ins: list[float] = []
    served: list[float] = []  # page views of the patients whose browsers run elsewhere
    loads: list[float] = []
    first_byte: list[float] = []  # navigation to the page's first byte: the server's part
    seen: list[float] = []  # as the bench's Playwright client sees it (its polling included)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(**launch_options())
        contexts = [
            await browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
            for _ in usernames
        ]
        pages = [await context.new_page() for context in contexts]

        async def sign_in(page: Page, username: str) -> None:
            await page.goto(f"{portal}/signin")
            await page.get_by_role("link", name="Sign in").click()
            await page.get_by_label("Username").fill(username)
            await page.get_by_label("Password", exact=True).fill(PASSWORD)
            started = time.perf_counter()
            await page.get_by_role("button", name="Sign in").click()
            await results_drawn(page, results)
            sign_ins.append(time.perf_counter() - started)

        await asyncio.gather(*(sign_in(p, u) for p, u in zip(pages, usernames, strict=True)))

        async def reload(page: Page) -> None:
            for _ in range(rounds):
                await asyncio.sleep(random.uniform(0, 2 * think_s))  # the patient reads
                started = time.perf_counter()
                answer = await page.goto(f"{portal}/")
                try:
                    await results_drawn(page, results)
                except AssertionError:
                    # Say what the patient saw instead (the page's address, status, heading).
                    heading = await page.locator("h1").all_inner_texts()
                    status = answer.status if answer is not None else None
                    raise RuntimeError(f"{page.url}: HTTP {status}, {heading}") from None
                seen.append(time.perf_counter() - started)
                first_byte_ms, drawn_ms = await page.evaluate(
                    "[performance.getEntriesByType('navigation')[0].responseStart,"
                    " performance.getEntriesByName('results-drawn')[0].startTime]"
                )
                first_byte.append(first_byte_ms / 1000)
                loads.append(drawn_ms / 1000)

        # Patients past ``browsers`` go on over plain HTTP with their session cookie, as if
        # their browsers ran on their own phones: the same page and event stream, no
        # Chromium on these 2 cores.
        elsewhere = [await context.cookies() for context in contexts[browsers:]]
        for context in contexts[browsers:]:
            await context.close()
        done = asyncio.Event()

        async def remote(cookies: list) -> None:
            jar = httpx.Cookies()
            for cookie in cookies:
                jar.set(cookie["name"], cookie["value"], domain=cookie["domain"])
            async with httpx.AsyncClient(base_url=portal, cookies=jar, timeout=60) as http:

                async def listen() -> None:
                    async with http.stream("GET", "/events") as stream:
                        async for _ in stream.aiter_lines():
                            pass

                listener = asyncio.create_task(listen())
                while not done.is_set():
                    await asyncio.sleep(random.uniform(0, 2 * think_s))
                    started = time.perf_counter()
                    answer = await http.get("/")
                    if answer.status_code != 200 or answer.text.count("data-score=") < results:
                        raise RuntimeError(f"a page over HTTP: {answer.status_code}")
                    served.append(time.perf_counter() - started)
                listener.cancel()

        async def in_browsers() -> None:
            await asyncio.gather(*(reload(p) for p in pages[:browsers]))
            done.set()

        before = cpu_by_part(*pids)
        await asyncio.gather(in_browsers(), *(remote(cookies) for cookies in elsewhere))
        after = cpu_by_part(*pids)
        await browser.close()
    views = {"portal": len(loads) + len(served), "FHIR API": len(loads) + len(served)}
    cpu_ms = {
        part: (after[part] - before.get(part, 0.0)) * 1000 / views.get(part, len(loads))
        for part in after
    }
    return sign_ins, loads, first_byte, seen, served, cpu_ms


def memory_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--patients", type=int, default=8)
    args.add_argument("--results", type=int, default=50)
    args.add_argument("--rounds", type=int, default=10)
    args.add_argument(
        "--think-s",
        type=float,
        default=0.0,
        help="mean pause before each page view, drawn from 0 to twice it (0: none, a stress)",
    )
    args.add_argument(
        "--browsers",
        type=int,
        default=0,
        help="patients who keep using Chromium after signing in (0: all); the others go on"
        " over HTTP with their session, as if their browsers ran on their own devices",
    )
    opts = args.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = StackConfig(
            var=Path(tmp),
            ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
            chatbot=True,  # the portal runs with the stack that requires tokens
            only=("fhir-api", "portal"),
        )
        stack = Stack(config)
        stack.start(timeout=300)
        try:
            auth = f"http://127.0.0.1:{config.ports.fhir}"
            engine_url = f"sqlite:///{config.var / 'fhir.db'}"
            codes = [f"PORTAL-BENCH-{n}" for n in range(opts.patients)]
            records = {
                code: chatbot_records.patient_records(code, "Bench^Patient", studies(opts.results))
                for code in codes
            }
            system = dev_tokens(config.var).issue("bench", parse_scopes("system/*.write"))[0]
            chatbot_records.seed(config.fhir_base, {"Authorization": f"Bearer {system}"}, records)
            usernames = [f"bench-{n}" for n in range(opts.patients)]
            for code, username in zip(codes, usernames, strict=True):
                activate(auth, engine_url, chatbot_records.patient_id(code), username)
            engine = make_engine(engine_url)
            try:
                clients.register_app(engine, BENCH_APP, [BENCH_REDIRECT])
            finally:
                engine.dispose()

            round_trips: list[float] = []
            lock = threading.Lock()

            def signer(username: str) -> None:
                for _ in range(opts.rounds):
                    elapsed = sign_in_round_trip(auth, config.fhir_base, username)
                    with lock:
                        round_trips.append(elapsed)

            threads = [threading.Thread(target=signer, args=(u,)) for u in usernames]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if len(round_trips) != opts.patients * opts.rounds:
                raise RuntimeError("a sign-in thread failed (its traceback is above)")

            portal_pid = stack.service("portal").process.pid  # type: ignore[union-attr]
            api_pid = stack.service("fhir-api").process.pid  # type: ignore[union-attr]
            sign_ins, loads, first_byte, seen, served, cpu_ms = asyncio.run(
                browse(
                    config.portal_url,
                    usernames,
                    opts.results,
                    opts.rounds,
                    opts.think_s,
                    (portal_pid, api_pid),
                    opts.browsers or opts.patients,
                )
            )
            portal_peak = memory_mib(portal_pid)
            api_peak = memory_mib(api_pid)
        except BaseException:
            kept = Path(tempfile.gettempdir()) / "portal-bench-logs"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(stack.logs, kept)
            say(f"the services' logs: {kept}/")
            raise
        finally:
            stack.stop()

    say(
        f"{opts.patients} patients, {opts.results} results each, {opts.rounds} rounds, "
        f"mean pause before a page view {opts.think_s:g} s"
    )
    say(summary("sign-in round trip (authorize page, credentials, code, token; HTTP)", round_trips))
    say(summary("portal sign-in, all patients at once (click to results + chart drawn)", sign_ins))
    say(
        summary(
            f"results list + chart drawn ({opts.patients} patients at once; bar p95 <= 500 ms)",
            loads,
        )
    )
    say(summary("  of which: navigation to the page's first byte (portal + FHIR)", first_byte))
    say(summary("  the same loads as the bench's Playwright client saw them end", seen))
    if served:
        say(summary("the other patients' pages over HTTP (request to last byte)", served))
    say(
        "CPU per page view: portal and FHIR API per page served (event streams included),"
        " Chromium and the driver per page drawn in Chromium"
    )
    say("  " + ", ".join(f"{part} {ms:.0f} ms" for part, ms in cpu_ms.items()))
    say(f"peak memory: portal {portal_peak:.0f} MiB, FHIR API {api_peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
