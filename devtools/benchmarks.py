"""What the benchmarks in ``bench/`` share: their output line, the nearest-rank percentile
they report, and the commit a result was measured at."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    """One line of a benchmark's output, flushed (a long run is read while it runs)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def commit() -> str:
    """The checkout's short commit, marked when tracked files have uncommitted changes."""
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return done.stdout.strip() + (" (working tree with uncommitted changes)" if dirty else "")
