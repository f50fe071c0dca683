"""The viewer's bar (issue 17): the first slice shown with its heatmap ≤ 500 ms after a
clinician opens a scored study, in Chromium.

1. A scored MR study in the listener's file store: ``--slices`` slices of scanwatch.sample's MR
   series (the MNI152 brain, 16-bit), stored as the listener stores them, and its heatmap series
   written by the worker's own code (``inference_worker.heatmaps.write_heatmap_series``: one
   8-bit Secondary Capture per slice with its probabilities), the Grad-CAM maps and probabilities
   made up (the viewer's cost depends on the files, not on what the model said).
2. The FHIR API (tokens required; its own process, as deployed) and the console (served in the
   bench's process) on free ports; a clinician's session (its access token issued by the API's
   key set, as bench/worklist.py does).
3. ``--rounds`` openings of ``/studies/<uid>`` in Chromium (a new tab each time, the browser's
   cache kept: a clinician's browser has the script already): the time from navigation start to
   the ``viewer-first-slice`` mark viewer.js sets when the first slice is drawn with its heatmap
   (the first round, with an empty cache, is reported apart), and where one opening's time goes
   (the page's requests). Then, on one open study: a window change (values typed → new pixels,
   rendered by WADO-RS with ``window=``, a new window each time) and a slice step (a key press →
   the next slice drawn, prefetched), each ``--rounds`` times.

    .venv/bin/python bench/viewer.py --slices 38 --rounds 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pydicom
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.browser import launch_options  # noqa: E402
from devtools.kafka_local import free_port  # noqa: E402
from devtools.testing import served  # noqa: E402
from dicom_listener.adapters.filestore import FileStore  # noqa: E402
from inference_worker import heatmaps  # noqa: E402
from inference_worker.series import SourceSlice  # noqa: E402
from scanwatch.sample import build_mr_study  # noqa: E402
from services.auth.scopes import ROLE_SCOPES, parse_scopes  # noqa: E402
from services.auth.tokens import TokenService, load_key_set  # noqa: E402
from services.console.app import create_app as create_console  # noqa: E402
from services.console.config import Settings as ConsoleSettings  # noqa: E402
from services.console.tests.helpers import put  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.9901"
CLASSES = ["normal", "glioma", "meningioma", "pituitary"]
BAR_MS = 500.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, ms: list[float]) -> str:
    return (
        f"{name:34s} n={len(ms):3d}  p50 {statistics.median(ms):6.1f} ms"
        f"  p95 {percentile(ms, 0.95):6.1f} ms  max {max(ms):6.1f} ms"
    )


def write_study(store_dir: Path, tmp: Path, slices: int) -> int:
    """The scored study and its heatmap series; the rows × columns of a slice."""
    store = FileStore(store_dir)
    stored = [put(store, p) for p in build_mr_study(tmp, n_slices=slices, study_uid=STUDY)]
    first = pydicom.dcmread(stored[0], stop_before_pixels=True)
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in stored
    ]
    rng = np.random.default_rng(9901)
    size = 14  # the Grad-CAM grid of the shipped model's last convolution
    maps = rng.uniform(0, 1, (slices, size, size)).astype(np.float32)
    probabilities = rng.dirichlet(np.ones(len(CLASSES)), slices).astype(np.float32)
    heatmaps.write_heatmap_series(
        store.root, STUDY, sources, maps, probabilities, CLASSES, "brain-mri-anomaly", 1,
        datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    return int(first.Rows) * 10_000 + int(first.Columns)


@contextmanager
def fhir_api(var: Path, port: int) -> Iterator[None]:
    """The FHIR API (tokens required, SQLite) in its own process, as deployed: in the bench's
    process it would share the interpreter lock with the console."""
    env = {
        **os.environ,
        "SCANWATCH_FHIR_HOST": "127.0.0.1",
        "SCANWATCH_FHIR_PORT": str(port),
        "SCANWATCH_FHIR_DATABASE_URL": f"sqlite:///{var / 'fhir.db'}",
        "SCANWATCH_FHIR_AUTH_MODE": "required",
        "SCANWATCH_FHIR_SIGNING_KEYS_FILE": str(var / "keys.json"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.fhir_api", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # until it answers (or has died)
            if process.poll() is not None:
                raise RuntimeError(f"the FHIR API exited with {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def first_slice_ms(page: Page, url: str) -> float:
    page.goto(url)
    page.wait_for_function(
        "() => (document.getElementById('viewport').dataset.drawn || '').endsWith('+heatmap')",
        timeout=30_000,
    )
    mark = page.evaluate("performance.getEntriesByName('viewer-first-slice')[0].startTime")
    return float(mark)


def redraw_ms(page: Page, window: tuple[int, int] | None = None, key: str | None = None) -> float:
    """Milliseconds from typing a ``window`` (centre, width) or pressing ``key`` on the viewport
    to the viewport's next draw."""
    return float(
        page.evaluate(
            """async ([window, key]) => {
                const canvas = document.getElementById('viewport');
                const before = Number(canvas.dataset.draws || 0);
                const started = performance.now();
                if (window) {
                    document.getElementById('wl-center').value = String(window[0]);
                    const width = document.getElementById('wl-width');
                    width.value = String(window[1]);
                    width.dispatchEvent(new Event('change'));
                } else {
                    canvas.dispatchEvent(new KeyboardEvent('keydown', {key: key, bubbles: true}));
                }
                while (Number(canvas.dataset.draws || 0) === before) {
                    await new Promise(r => requestAnimationFrame(r));
                }
                return performance.now() - started;
            }""",
            [window, key],
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=38)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        var = Path(tmp)
        (var / "store").mkdir()
        shape = write_study(var / "store", var / "mr", args.slices)
        rows, columns = divmod(shape, 10_000)
        say(f"study: {args.slices} MR slices of {rows}×{columns}, each with its heatmap")
        fhir_port, console_port = free_port(), free_port()
        with fhir_api(var, fhir_port):
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
            app.state.console.top_up()
            web = app.state.web
            tokens = TokenService(load_key_set(var / "keys.json"))
            access, lifetime = tokens.issue(
                "bench-clinician",
                parse_scopes(" ".join(ROLE_SCOPES["clinician"])),
                claims={"roles": ["clinician"]},
            )
            session = web.sessions.new()
            session.account, session.roles = "bench-clinician", ("clinician",)
            session.access_token, session.expires_at = access, time.monotonic() + lifetime
            console = f"http://127.0.0.1:{console_port}"
            url = f"{console}/studies/{STUDY}"
            with served(app, console_port), sync_playwright() as playwright:
                browser = playwright.chromium.launch(**launch_options())
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.add_cookies(
                    [{"name": settings.session_cookie, "value": session.id, "url": console}]
                )
                cold = first_slice_ms(context.new_page(), url)
                say(f"{'first slice + heatmap, empty cache':34s} {cold:6.1f} ms")
                opened = []
                for _ in range(args.rounds):
                    tab = context.new_page()
                    opened.append(first_slice_ms(tab, url))
                    tab.close()
                say(summary("first slice + heatmap", opened))
                tab = context.new_page()
                first_slice_ms(tab, url)
                say("where one opening's time goes (ms from navigation start: request, answer):")
                for name, start, end in tab.evaluate(
                    "[['page', 0, performance.getEntriesByType('navigation')[0].responseEnd],"
                    " ...performance.getEntriesByType('resource').map(r =>"
                    " [r.name.replace(location.origin, '').slice(0, 90),"
                    " r.startTime, r.responseEnd])]"
                ):
                    say(f"  {start:6.1f} {end:6.1f}  {name}")
                tab.close()
                page = context.new_page()
                first_slice_ms(page, url)
                # A new window each time: no image of it is in the page's cache.
                windows = [
                    redraw_ms(page, window=(900 + i, 1800 + 7 * i)) for i in range(args.rounds)
                ]
                steps = [
                    redraw_ms(page, key="ArrowDown" if (i // 5) % 2 == 0 else "ArrowUp")
                    for i in range(args.rounds)
                ]
                say(summary("window change (server-rendered)", windows))
                say(summary("next slice (prefetched)", steps))
                browser.close()
            p95 = percentile(opened, 0.95)
            say(f"bar: first slice + heatmap p95 {p95:.1f} ms ≤ {BAR_MS:.0f} ms: "
                f"{'met' if p95 <= BAR_MS else 'NOT met'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
