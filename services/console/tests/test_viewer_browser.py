"""The clinician's viewer in a real browser (Chromium via Playwright) against the real
authorization server and console (the hospital of test_web_browser): a scored study with the
worker's own heatmap series (inference_worker.heatmaps over a stored MR series), scrolled by
keyboard, wheel and slider; window/level by preset, inputs and drag; each slice's probabilities;
the heatmap toggle; a study without heatmaps; an operator refused; a PatientName with markup shown
as text; axe-core; a screenshot."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from playwright.sync_api import Page, expect

from dicom_listener.adapters.filestore import FileStore
from inference_worker import heatmaps
from inference_worker.fhir_resources import resources_for
from inference_worker.series import SourceSlice
from scanwatch.sample import build_mr_study
from services.auth.scopes import ROLE_SCOPES, parse_scopes
from services.console import viewer
from services.console.tests import test_web_browser as hospital_web
from services.console.tests.helpers import put
from services.console.tests.test_web_browser import (
    SHOTS,
    Hospital,
    audit_of,
    axe_check,
    sign_in,
    store_study,
)
from services.fhir_api.tests.test_search import scored

# The hospital of test_web_browser (its own instance for this module); the browser and its
# tabs come from the console tests' conftest.py.
hospital = hospital_web.hospital

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
SCORED = "1.2.826.0.1.3680043.8.498.7001"
OLDER = "1.2.826.0.1.3680043.8.498.7002"
CLASSES = ["normal", "mass", "bleed", "infarct"]
#: Per slice: the strongest evidence is slice 4, where 1 - p(normal) is largest (0.99; mass
#: 0.45 its likeliest class), as the worker names it in the Observation, not slice 3, whose one
#: class is the most probable (mass 0.90; 1 - p(normal) 0.96).
PROBABILITIES = np.array(
    [
        [0.90, 0.04, 0.03, 0.03],
        [0.60, 0.30, 0.05, 0.05],
        [0.04, 0.90, 0.03, 0.03],
        [0.01, 0.45, 0.30, 0.24],
        [0.30, 0.55, 0.10, 0.05],
        [0.85, 0.10, 0.03, 0.02],
    ]
)
MARKUP_NAME = "<b>Doe</b>^<i>Jane</i>"
MARKUP_SERIES = "<img src=x> T1 AX"
MODEL, VERSION = "brain-mri-anomaly", 3


def test_the_viewer_knows_the_workers_heatmap_series_number() -> None:
    assert viewer.HEATMAP_SERIES_NUMBER == heatmaps.SERIES_NUMBER


def blob_maps(n: int, size: int = 64) -> np.ndarray:
    """Grad-CAM-like maps: one smooth blob per slice, moving across the slices."""
    y, x = np.mgrid[0:size, 0:size] / size
    maps = [
        np.exp(-((x - 0.35 - 0.05 * i) ** 2 + (y - 0.45) ** 2) / 0.01).astype(np.float32)
        for i in range(n)
    ]
    return np.stack(maps)


def store_scored_study(store_dir: Path, tmp: Path, study: str, name: str) -> heatmaps.HeatmapSeries:
    """An MR study stored as the listener stores it, with the heatmap series the worker
    writes for it."""
    store = FileStore(store_dir)
    paths = build_mr_study(tmp / "mr", n_slices=len(PROBABILITIES), study_uid=study)
    stored = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = name, "PID-001"
        ds.SeriesDescription = MARKUP_SERIES
        ds.save_as(path)
        stored.append(put(store, path))
    sources = [
        SourceSlice(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p, None)
        for p in stored
    ]
    return heatmaps.write_heatmap_series(
        store.root, study, sources, blob_maps(len(sources)), PROBABILITIES.astype(np.float32),
        CLASSES, MODEL, VERSION, datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip


@dataclass
class Studies:
    scored: heatmaps.HeatmapSeries


@pytest.fixture(scope="module")
def studies(hospital: Hospital, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studies]:
    tmp = tmp_path_factory.mktemp("viewer-studies")
    series = store_scored_study(hospital.store, tmp, SCORED, MARKUP_NAME)
    # The study's AI result in FHIR, as the worker writes it for the same model and classes.
    study = replace(
        scored(SCORED, "PID-001"),
        model_name=MODEL,
        model_version=VERSION,
        class_names=tuple(CLASSES),
        probabilities=tuple(float(p) for p in PROBABILITIES[3]),
    )
    for resource in resources_for(study):
        answer = httpx.put(
            f"{hospital.fhir}/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers=hospital.system_headers(),
        )
        assert answer.status_code in (200, 201), answer.text
    store_study(hospital, tmp, OLDER, "Older^Model", "20250101", n=2)
    yield Studies(series)


def viewport(page: Page, n: int, m: int) -> None:
    """Wait until slice ``n`` of ``m`` is named and drawn."""
    expect(page.get_by_role("img", name=re.compile(rf"^Slice {n} of {m}\b"))).to_be_visible()
    page.wait_for_function(
        "n => document.getElementById('viewport').dataset.drawn?.startsWith(String(n))", arg=n
    )


def probability(page: Page, name: str) -> str:
    row = page.locator("#probability-rows tr").filter(
        has=page.get_by_role("rowheader", name=re.compile(f"^{name}"))
    )
    return row.locator(".value").inner_text()


def pixels(page: Page) -> str:
    return str(page.evaluate("() => document.getElementById('viewport').toDataURL()"))


def test_clinician_reads_a_scored_study_with_its_evidence(
    hospital: Hospital, studies: Studies, page: Page
) -> None:
    sign_in(page, hospital, "dr.ada")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    answer = page.goto(f"{hospital.console}/studies/{SCORED}")
    assert answer is not None and answer.status == 200
    # Markup in PatientName is text, not markup.
    heading = page.get_by_role("heading", level=1)
    expect(heading).to_contain_text("<b>Doe</b> <i>Jane</i>")
    assert heading.locator("b, i").count() == 0
    # So is the series description the script reads from DICOMweb (set as text, never HTML).
    expect(page.locator("#viewer-status")).to_contain_text(MARKUP_SERIES)
    assert page.locator("#viewer img").count() == 0
    expect(page.get_by_text("Abnormal")).to_be_visible()
    # Opened at the strongest evidence (slice 4 of 6), its heatmap on.
    viewport(page, 4, 6)
    expect(page.get_by_role("img", name=re.compile("AI heatmap shown"))).to_be_visible()
    image = page.get_by_role("img", name=re.compile("^Slice"))
    assert image.get_attribute("data-drawn") == "4+heatmap"
    expect(page.get_by_text("the strongest evidence in this study")).to_be_visible()
    assert probability(page, "mass") == "45.0 %"
    expect(
        page.get_by_role("button", name=re.compile("strongest evidence: slice 4"))
    ).to_be_visible()
    expect(page.get_by_text("brain-mri-anomaly version 3")).to_be_visible()
    axe_check(page, "the viewer")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "viewer.png"), full_page=True)

    # Keyboard on the focused viewport; the probabilities follow the slice.
    image.focus()
    page.keyboard.press("ArrowDown")
    viewport(page, 5, 6)
    assert probability(page, "mass") == "55.0 %"
    page.keyboard.press("PageUp")
    viewport(page, 4, 6)
    page.keyboard.press("Home")
    viewport(page, 1, 6)
    assert probability(page, "normal") == "90.0 %"
    # The wheel over the image, then the slider.
    box = page.locator("#viewport").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    viewport(page, 2, 6)
    page.get_by_label("Slice", exact=True).fill("6")
    viewport(page, 6, 6)
    assert probability(page, "normal") == "85.0 %"
    page.get_by_role("button", name=re.compile("strongest evidence")).click()
    viewport(page, 4, 6)

    # Window/level: a preset, typed values, a drag; each redraws through WADO-RS rendered.
    before = pixels(page)
    with page.expect_response(lambda r: "window=40%2C80" in r.url and r.status == 200):
        page.get_by_label("Preset").select_option(label="Brain (40 / 80)")
    page.wait_for_function(
        "before => document.getElementById('viewport').toDataURL() !== before", arg=before
    )
    expect(page.get_by_label("Level (centre)")).to_have_value("40")
    with page.expect_response(lambda r: "window=300%2C900" in r.url and r.status == 200):
        page.get_by_label("Level (centre)").fill("300")
        page.get_by_label("Window (width)").fill("900")
        page.get_by_label("Window (width)").press("Tab")
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 160, box["y"] + 140, steps=4)
    page.mouse.up()
    expect(page.get_by_label("Window (width)")).not_to_have_value("900")
    expect(page.get_by_label("Level (centre)")).not_to_have_value("300")

    # The heatmap: off, then on with another opacity.
    with_map = pixels(page)
    page.get_by_label("Show AI heatmap").uncheck()
    expect(page.get_by_role("img", name=re.compile(r"^Slice 4 of 6, strongest"))).to_be_visible()
    page.wait_for_function("() => document.getElementById('viewport').dataset.drawn === '4'")
    assert pixels(page) != with_map
    page.get_by_label("Show AI heatmap").check()
    page.wait_for_function(
        "() => document.getElementById('viewport').dataset.drawn === '4+heatmap'"
    )
    # A stronger opacity paints more of the map over the slice.
    half = pixels(page)
    page.get_by_label("Heatmap opacity").fill("100")
    page.wait_for_function(
        "before => document.getElementById('viewport').toDataURL() !== before", arg=half
    )
    page.wait_for_function(
        "() => document.getElementById('viewport').dataset.drawn === '4+heatmap'"
    )

    # The session's DICOMweb path answers as the bearer path does (the same handlers).
    path = f"/studies/{SCORED}/series/{studies.scored.SeriesInstanceUID}/metadata"
    mine = page.request.get(f"{hospital.console}/viewer/dicomweb{path}")
    token, _ = hospital.tokens.issue(
        "dr.ada",
        parse_scopes(" ".join(ROLE_SCOPES["clinician"])),
        claims={"roles": ["clinician"]},
    )
    theirs = httpx.get(
        f"{hospital.console}/dicomweb{path}", headers={"Authorization": f"Bearer {token}"}
    )
    assert mine.status == 200 and theirs.status_code == 200, theirs.text
    assert mine.json() == theirs.json() and len(mine.json()) == len(PROBABILITIES)

    # The images came through the session's DICOMweb path; opening was audited.
    events = audit_of(hospital, "dr.ada")
    opened = [e for e in events if e["type"]["code"] == "110103"]
    assert any(e["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{SCORED}" for e in opened)
    html = page.content()
    assert "Bearer" not in html and "access_token" not in html


def test_a_study_without_heatmaps_still_shows_its_slices(
    hospital: Hospital, studies: Studies, page: Page
) -> None:
    sign_in(page, hospital, "dr.eve")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    page.goto(f"{hospital.console}/studies/{OLDER}")
    expect(page.get_by_text("No heatmap for this study")).to_be_visible()
    viewport(page, 1, 2)
    expect(page.get_by_label("Show AI heatmap")).to_be_hidden()
    page.get_by_role("img", name=re.compile("^Slice")).focus()
    page.keyboard.press("PageDown")
    viewport(page, 2, 2)
    axe_check(page, "the viewer without heatmaps")


def test_operators_and_strangers_get_no_images(
    hospital: Hospital, studies: Studies, page: Page
) -> None:
    sign_in(page, hospital, "ops.bob")
    expect(page).to_have_url(f"{hospital.console}/worklist")
    answer = page.goto(f"{hospital.console}/studies/{SCORED}")
    assert answer is not None and answer.status == 403
    series = page.request.get(f"{hospital.console}/viewer/dicomweb/studies/{SCORED}/instances")
    assert series.status == 403
    # No session: no image (a sign-in is asked for), and the bearer path still needs a token.
    bare = httpx.get(f"{hospital.console}/viewer/dicomweb/studies/{SCORED}/instances")
    assert bare.status_code in (303, 401)
    assert httpx.get(f"{hospital.console}/dicomweb/studies/{SCORED}/series").status_code == 401
