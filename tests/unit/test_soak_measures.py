"""The soak's measures and judge (``bench/soak.py``, ``devtools/process_stats.py``): memory as
PSS, the broker judged on its JVM's heap after a full collection (forced with jcmd), RSS
shown but not judged."""

from __future__ import annotations

import importlib.util
import mmap
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from devtools import process_stats
from devtools.kafka_local import LocalKafka

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --- PSS ---------------------------------------------------------------------------------------


def test_pss_counts_a_page_two_processes_share_once_where_rss_counts_it_twice() -> None:
    size = 64 * MIB
    shared = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    shared.write(b"\1" * size)  # the parent touches every page
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # touch every page too (reading maps them), then wait to be measured
        try:
            os.close(ready_r)
            os.close(done_w)
            total = sum(shared[i] for i in range(0, size, mmap.PAGESIZE))
            os.write(ready_w, b"1" if total else b"0")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"1"
        procs = process_stats.snapshot()
        pair = (os.getpid(), child)
        rss = sum(procs[p].rss_bytes for p in pair)
        pss = sum(process_stats.pss_bytes(p) for p in pair)
        # Both map the 64 MiB: RSS sums them twice, PSS once (half to each).
        assert rss - pss > 0.8 * size
        assert 0 < process_stats.pss_bytes(child) < procs[child].rss_bytes
        # A shared anonymous mapping is shared memory: the split the soak keeps for PostgreSQL.
        shmem = sum(process_stats.pss_bytes(p, "Pss_Shmem") for p in pair)
        assert 0.9 * size < shmem <= pss
    finally:
        os.write(done_w, b"x")
        os.waitpid(child, 0)
        shared.close()


def test_a_family_usage_sums_pss_and_a_gone_process_has_none() -> None:
    used = process_stats.usage(process_stats.snapshot(), os.getpid())
    assert used is not None
    assert 0 < used.pss_bytes <= used.rss_bytes
    assert 0 <= used.pss_shmem_bytes <= used.pss_bytes
    assert process_stats.pss_bytes(2**22 + 7) == 0  # above pid_max's default: never a process


# --- the broker's GC log ----------------------------------------------------------------------

GC_LOG = """\
[0.011s] Using G1
[5.183s] GC(0) Pause Young (Normal) (G1 Evacuation Pause) 24M->6M(256M) 13.714ms
[61.2s] GC(1) Pause Young (Concurrent Start) (G1 Evacuation Pause) 140M->98M(256M) 9.1ms
[61.3s] GC(2) Concurrent Mark Cycle
[61.9s] GC(2) Pause Remark 101M->97M(256M) 2.6ms
[62.0s] GC(2) Pause Cleanup 97M->97M(256M) 0.1ms
[62.4s] GC(2) Concurrent Mark Cycle 1100.125ms
[70.5s] GC(3) Pause Young (Mixed) (G1 Evacuation Pause) 150M->61M(256M) 7.7ms
[99.0s] GC(4) Pause Full (System.gc()) 70M->512K(1G) 40.1ms
"""


def test_gc_pauses_read_the_heap_before_and_after_each_pause_in_its_unit() -> None:
    pauses = process_stats.gc_pauses(GC_LOG)
    assert [p.number for p in pauses] == [0, 1, 2, 2, 3, 4]  # not the concurrent cycle
    first, mixed, full = pauses[0], pauses[4], pauses[5]
    assert (first.uptime_s, first.before_bytes, first.after_bytes, first.committed_bytes) == (
        5.183,
        24 * MIB,
        6 * MIB,
        256 * MIB,
    )
    assert first.kind == "Pause Young (Normal) (G1 Evacuation Pause)"
    assert mixed.kind.startswith("Pause Young (Mixed)") and mixed.after_bytes == 61 * MIB
    assert full.kind == "Pause Full (System.gc())"
    assert (full.after_bytes, full.committed_bytes) == (512 * 2**10, 2**30)


def test_the_broker_writes_its_gc_log_into_its_home(tmp_path: Path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "kafka_2.13-3.9.0.jar").touch()
    broker = LocalKafka(tmp_path / "broker", libs)
    command = broker.broker_command(tmp_path / "server.properties")
    assert f"-Xlog:gc:file={broker.gc_log}:uptime:filecount=2,filesize=10m" in command
    assert command.index("kafka.Kafka") > command.index(f"-Xmx{broker.heap}")  # a JVM option
    assert broker.gc_log.parent == broker.home


def test_the_broker_heap_sample_is_the_latest_pause(soak: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "gc.log"
    assert soak.broker_heap(log, 1.0) == []  # no log yet (or another stack's broker)
    log.write_text("[0.011s] Using G1\n")
    assert soak.broker_heap(log, 1.0) == []  # no collection yet
    log.write_text(GC_LOG)
    found = {s.metric: s.value for s in soak.broker_heap(log, 7.0)}
    assert found == {
        "heap_after_full_gc_mib": 0.5,
        "heap_after_gc_mib": 0.5,
        "heap_committed_mib": 1024,
        "gc_pauses": 6,
        "gc_full_pauses": 1,
        "gc_mixed_pauses": 1,
    }
    log.write_text(
        GC_LOG + "[120.1s] GC(5) Pause Young (Normal) (G1 Evacuation Pause) 80M->9M(1G) 3ms\n"
    )
    found = {s.metric: s.value for s in soak.broker_heap(log, 8.0)}
    assert (found["heap_after_full_gc_mib"], found["heap_after_gc_mib"]) == (0.5, 9)
    log.write_text(GC_LOG.split("[99.0s]")[0])  # no full collection yet: no such sample
    assert "heap_after_full_gc_mib" not in {s.metric for s in soak.broker_heap(log, 9.0)}


@pytest.mark.integration
def test_a_forced_collection_is_read_back_as_the_brokers_heap_after_a_full_gc(
    soak: ModuleType, kafka: LocalKafka
) -> None:
    def full_pauses() -> float:
        found = {s.metric: s.value for s in soak.broker_heap(kafka.gc_log, 0.0)}
        return found.get("gc_full_pauses", 0.0)

    before = full_pauses()
    assert soak.collect_broker_heap(kafka.pid()) is None
    found = {s.metric: s.value for s in soak.broker_heap(kafka.gc_log, 0.0)}
    assert found["gc_full_pauses"] == before + 1
    assert 0 < found["heap_after_full_gc_mib"] < found["heap_committed_mib"]
    assert soak.collect_broker_heap(None) == "the broker is not running"


# --- the judge --------------------------------------------------------------------------------


def series(soak: ModuleType, service: str, metric: str, values: list[float]) -> list:
    """One sample a minute, from minute 0."""
    return [soak.Sample(60.0 * n, service, metric, v) for n, v in enumerate(values)]


FLAT = [100.0] * 10
GROWING = [100.0 + 10 * n for n in range(10)]  # minute 9: 190, far past 100's tolerance


def verdicts_by_key(soak: ModuleType, samples: list) -> dict:
    found = soak.judge(samples, warmup_s=180.0, judge_from_s=360.0)
    return {(v.service, v.metric): v for v in found}


def test_postgresql_rss_and_shared_buffers_growth_is_shown_and_its_flat_private_pss_passes(
    soak: ModuleType,
) -> None:
    samples = series(soak, "postgresql", "rss_mib", GROWING)
    samples += series(soak, "postgresql", "pss_mib", GROWING)  # its buffer cache filling
    samples += series(soak, "postgresql", "pss_private_mib", FLAT)
    found = verdicts_by_key(soak, samples)
    rss, pss = found[("postgresql", "rss_mib")], found[("postgresql", "pss_mib")]
    private = found[("postgresql", "pss_private_mib")]
    assert rss.passed is None and "PSS is judged" in rss.not_judged[1]
    assert rss.judged > rss.limit  # it did grow: shown as it was
    assert pss.passed is None and "shared_buffers" in pss.not_judged[1]
    assert pss.judged > pss.limit
    assert private.passed is True and private.not_judged is None
    assert soak.bar_passed(list(found.values()))


def test_postgresql_private_memory_growth_fails_the_bar(soak: ModuleType) -> None:
    samples = series(soak, "postgresql", "pss_mib", FLAT)
    samples += series(soak, "postgresql", "pss_private_mib", GROWING)
    found = verdicts_by_key(soak, samples)
    assert found[("postgresql", "pss_private_mib")].passed is False
    assert not soak.bar_passed(list(found.values()))


def test_the_pss_panel_draws_postgresqls_private_pss_in_place_of_its_whole_pss(
    soak: ModuleType,
) -> None:
    drawn = {
        (service, metric): soak.plotted_as(soak.Sample(0.0, service, metric, 1.0))
        for service in ("postgresql", "fhir-api")
        for metric in ("pss_mib", "pss_private_mib")
    }
    assert drawn[("postgresql", "pss_private_mib")] == "pss_mib"
    assert drawn[("postgresql", "pss_mib")] is None
    assert drawn[("fhir-api", "pss_mib")] == "pss_mib"


def test_pss_growth_fails_the_bar(soak: ModuleType) -> None:
    samples = series(soak, "portal", "pss_mib", GROWING) + series(soak, "portal", "rss_mib", FLAT)
    found = verdicts_by_key(soak, samples)
    assert found[("portal", "pss_mib")].passed is False
    assert not soak.bar_passed(list(found.values()))


def test_the_broker_is_judged_on_its_heap_after_a_full_gc_not_its_memory(
    soak: ModuleType,
) -> None:
    samples = series(soak, "kafka", "rss_mib", GROWING) + series(soak, "kafka", "pss_mib", GROWING)
    samples += series(soak, "kafka", "heap_after_gc_mib", GROWING)  # old garbage, not a leak
    samples += series(soak, "kafka", "heap_after_full_gc_mib", FLAT)
    found = verdicts_by_key(soak, samples)
    for metric in ("rss_mib", "pss_mib", "heap_after_gc_mib"):
        assert found[("kafka", metric)].passed is None
        assert "heap after a full collection is judged" in found[("kafka", metric)].not_judged[1]
    assert found[("kafka", "heap_after_full_gc_mib")].passed is True
    assert soak.bar_passed(list(found.values()))


def test_a_growing_heap_after_a_full_gc_fails_the_broker(soak: ModuleType) -> None:
    samples = series(soak, "kafka", "heap_after_full_gc_mib", GROWING)
    found = verdicts_by_key(soak, samples)
    assert found[("kafka", "heap_after_full_gc_mib")].passed is False
    assert not soak.bar_passed(list(found.values()))


def test_a_judged_metric_without_samples_fails_the_bar(soak: ModuleType) -> None:
    samples = series(soak, "kafka", "heap_after_full_gc_mib", [100.0])  # only in the warm-up
    found = verdicts_by_key(soak, samples)
    assert found[("kafka", "heap_after_full_gc_mib")].passed is None
    assert not soak.bar_passed(list(found.values()))
