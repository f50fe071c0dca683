"""Debian's Chromium as the browser tests and benchmarks drive it (DESIGN §4): Playwright
launches ``/usr/bin/chromium`` (a browser download fails here) headless, without the
background services that keep calling hosts this network refuses; Playwright gives every
launch a fresh, temporary user-data directory. Also the form of an HTML page as a browser
would submit it, for tests that walk pages over plain HTTP."""

from __future__ import annotations

import html
import re
from typing import Any

#: Debian's Chromium (``scripts/bootstrap.sh`` installs it).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)

_INPUT = re.compile(r"<input\b[^>]*>")
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def launch_options() -> dict[str, Any]:
    """Keyword arguments of Playwright's ``chromium.launch`` (sync and async alike)."""
    return {"executable_path": CHROMIUM, "headless": True, "args": list(CHROMIUM_ARGS)}


def form_fields(page: str) -> dict[str, str]:
    """The name → value of every input of ``page`` that has a name (hidden ones, such as a
    CSRF token, included)."""
    fields = {}
    for tag in _INPUT.findall(page):
        attrs = {k: html.unescape(v) for k, v in _ATTR.findall(tag)}
        if "name" in attrs:
            fields[attrs["name"]] = attrs.get("value", "")
    return fields
