"""What each process of a running stack holds, read from ``/proc`` (Linux; standard library
only): resident memory (RSS and PSS), open file descriptors, threads and CPU time, summed over a
service's process family (the process, everything in its process group, and their descendants:
Rasa's Sanic workers, the listener's publisher, PostgreSQL's backends). ``bench/soak.py``
samples it.

RSS summed over a family counts a page that several of its processes map once per process:
PostgreSQL's shared buffers, touched by every backend that reads them, look like growth of
each backend. PSS (proportional set size, ``/proc/<pid>/smaps_rollup``) charges a shared page
to each of its ``n`` sharers by ``1/n``, so the family's sum counts it once: the memory the
family really holds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: A collection pause in a JVM's unified GC log (``-Xlog:gc``, uptime decoration), e.g.
#: ``[5.183s] GC(0) Pause Young (Normal) (G1 Evacuation Pause) 6M->3M(64M) 113.714ms``.
_GC_PAUSE = re.compile(
    r"^\[(?P<uptime>[\d.]+)s\].*? GC\((?P<n>\d+)\) (?P<kind>Pause .*?) "
    r"(?P<before>\d+)(?P<bu>[BKMG])->(?P<after>\d+)(?P<au>[BKMG])\((?P<size>\d+)(?P<su>[BKMG])\)"
)
_UNIT = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30}
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
    pss_bytes: int
    #: Of which shared memory (``Pss_Shmem``): PostgreSQL's buffer cache, bounded by its
    #: shared_buffers, filling as the data it caches grows.
    pss_shmem_bytes: int
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


def pss_fields(pid: int) -> dict[str, int]:
    """The proportional set sizes of ``pid`` in bytes, by line of ``/proc/<pid>/smaps_rollup``
    (``Pss``, ``Pss_Anon``, ``Pss_Shmem``...), in one read; empty when it has gone or cannot be
    read."""
    found: dict[str, int] = {}
    try:
        with open(PROC / str(pid) / "smaps_rollup") as fp:
            for line in fp:
                if line.startswith("Pss"):
                    name, value = line.split()[:2]
                    found[name.rstrip(":")] = int(value) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return found


def pss_bytes(pid: int, field: str = "Pss") -> int:
    """One line of :func:`pss_fields` (``Pss``: the whole proportional set size); 0 when the
    process has gone or cannot be read."""
    return pss_fields(pid).get(field, 0)


def usage(procs: dict[int, Proc], root: int | None) -> Usage | None:
    """The sums over ``root``'s :func:`family` (None: no such process). RSS is summed per
    process, so pages that forked processes share count once per process; PSS counts them
    once in all."""
    if root is None:
        return None
    members = family(procs, root)
    if not members:
        return None
    pss = [pss_fields(m) for m in members]
    return Usage(
        processes=len(members),
        rss_bytes=sum(procs[m].rss_bytes for m in members),
        pss_bytes=sum(p.get("Pss", 0) for p in pss),
        pss_shmem_bytes=sum(p.get("Pss_Shmem", 0) for p in pss),
        fds=sum(open_fds(m) for m in members),
        threads=sum(procs[m].threads for m in members),
        cpu_s=sum(procs[m].cpu_s for m in members),
    )


@dataclass(frozen=True)
class GcPause:
    """One collection pause of a JVM, as its GC log states it."""

    uptime_s: float  # since the JVM started
    number: int  # GC(n)
    kind: str  # "Pause Young (Normal) (G1 Evacuation Pause)", "Pause Full (System.gc())", ...
    before_bytes: int  # heap used before the pause
    after_bytes: int  # heap used after it: what the collector could not free
    committed_bytes: int  # heap committed (the size in parentheses)


def gc_pauses(text: str) -> list[GcPause]:
    """The collection pauses in the text of a unified GC log (``-Xlog:gc``, the JVM's default
    ``uptime`` decoration first); other lines (``Using G1``, concurrent cycles) are skipped."""
    found = []
    for line in text.splitlines():
        if (m := _GC_PAUSE.match(line)) is None:
            continue
        found.append(
            GcPause(
                uptime_s=float(m["uptime"]),
                number=int(m["n"]),
                kind=m["kind"].strip(),
                before_bytes=int(m["before"]) * _UNIT[m["bu"]],
                after_bytes=int(m["after"]) * _UNIT[m["au"]],
                committed_bytes=int(m["size"]) * _UNIT[m["su"]],
            )
        )
    return found
