"""What the benchmarks in ``bench/`` share: their output line, the nearest-rank percentile
they report, the commit a result was measured at, and the development stack they start (and
its scoring services' niceness, an option of the benches that start it)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from devtools.kafka_local import free_port
from devtools.stack import Ports, StackConfig

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


def stack_config(var: Path, **settings: Any) -> StackConfig:
    """The development stack in ``var`` on free ports, with the checkout's model repository
    and Kafka jars (what the bootstrap made); ``settings``: other ``StackConfig`` fields."""
    return StackConfig(
        var=var,
        ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
        models=ROOT / "var" / "models",
        kafka_libs=ROOT / "var" / "kafka" / "libs",
        **settings,
    )


def add_scoring_nice(parser: argparse.ArgumentParser) -> None:
    """``--scoring-nice N``: the stack's ``StackConfig.scoring_nice`` for a bench's run."""
    parser.add_argument(
        "--scoring-nice",
        type=int,
        default=StackConfig.scoring_nice,
        help="niceness of the scoring services (default: make run's)",
    )
