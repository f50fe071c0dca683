"""What each process of a running stack holds, read from ``/proc`` (Linux; standard library
only): resident memory, open file descriptors, threads and CPU time, summed over a service's
process family (the process, everything in its process group, and their descendants: Rasa's
Sanic workers, the listener's publisher, PostgreSQL's backends). ``bench/soak.py`` samples it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc/<pid>/stat`` and ``statm`` describe it."""

    pid: int
    ppid: int
    pgrp: int
    threads: int
    cpu_s: float  # user + system
    rss_bytes: int


@dataclass(frozen=True)
class Usage:
    """A process family's sums."""

    processes: int
    rss_bytes: int
    fds: int
    threads: int
    cpu_s: float


def snapshot() -> dict[int, Proc]:
    """Every process this one can read, by pid (one that exits meanwhile is left out)."""
    found: dict[int, Proc] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            resident = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        pid = int(entry.name)
        found[pid] = Proc(
            pid=pid,
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            threads=int(fields[17]),
            cpu_s=(int(fields[11]) + int(fields[12])) / _TICK,
            rss_bytes=resident * _PAGE,
        )
    return found


def family(procs: dict[int, Proc], root: int) -> set[int]:
    """``root``, the members of its process group when it leads one (the stack starts each
    service in a session of its own), and all their descendants."""
    if root not in procs:
        return set()
    members = {root} | ({p.pid for p in procs.values() if p.pgrp == root})
    grown = set(members)
    while grown:
        grown = {p.pid for p in procs.values() if p.ppid in grown} - members
        members |= grown
    return members


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (0 when it has gone)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return 0


def usage(procs: dict[int, Proc], root: int | None) -> Usage | None:
    """The sums over ``root``'s :func:`family` (None: no such process). RSS is summed per
    process, so pages that forked processes share count once per process."""
    if root is None:
        return None
    members = family(procs, root)
    if not members:
        return None
    return Usage(
        processes=len(members),
        rss_bytes=sum(procs[m].rss_bytes for m in members),
        fds=sum(open_fds(m) for m in members),
        threads=sum(procs[m].threads for m in members),
        cpu_s=sum(procs[m].cpu_s for m in members),
    )
