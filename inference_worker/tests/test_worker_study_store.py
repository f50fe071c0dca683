"""The study table's layout (:class:`StudyStore`): what the flow writes there, how big, in which
order, and what a new store (a restarted worker, its table restored) reads back."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from faust.serializers import codecs

from inference_worker.assembly import (
    ACQUISITION_NUMBER,
    IMAGES_IN_ACQUISITION,
    StudyState,
    add_instance,
    add_step,
    mark_announced,
    park,
)
from inference_worker.errors import ModelUnavailable
from inference_worker.flow import Origin
from inference_worker.study_store import StudyStore, instance_key, step_key
from inference_worker.tests import test_worker_flow
from inference_worker.tests.test_worker_assembly import received
from inference_worker.tests.test_worker_flow import KEY, QUIET, STUDY, World, step
from schemas import InferenceResultV1, InstanceReceivedV1, ProcedureStepV1, StepInstanceRef


class Table(dict[bytes, Any]):
    """A dict standing in for the Faust table: every write recorded as the changelog record
    Faust would send (the key's raw bytes, the value in the table's JSON codec; None: a
    tombstone), and every pass over its keys counted."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.records: list[tuple[bytes, bytes | None]] = []
        self.scans = 0

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.records.append((key, codecs.dumps("json", value)))
        super().__setitem__(key, value)

    def __delitem__(self, key: bytes) -> None:
        self.records.append((key, None))
        super().__delitem__(key)

    def keys(self) -> Any:
        self.scans += 1
        return super().keys()

    def sizes(self) -> list[int]:
        return [len(key) + len(value or b"") for key, value in self.records]

    def restored(self, records: int | None = None) -> Table:
        """A table rebuilt from the first ``records`` of the changelog (all by default), as a
        worker restarting after a crash would restore it: JSON values, tombstones applied."""
        table = Table()
        for key, value in self.records[:records]:
            if value is None:
                dict.pop(table, key, None)
            else:
                dict.__setitem__(table, key, codecs.loads("json", value))
        return table


def store_world(**settings: object) -> tuple[World, Table]:
    """The flow's test world with its study table in the store's layout."""
    world = World(**settings)  # type: ignore[arg-type]
    table = Table()
    world.studies = world.flow.studies = StudyStore(table)  # type: ignore[assignment]
    return world, table


COUNTS = ((IMAGES_IN_ACQUISITION, b"3000"), (ACQUISITION_NUMBER, b"1"))


async def assemble(world: World, n: int, study: str = STUDY, sha: str = "ab") -> InstanceReceivedV1:
    """Instance ``n`` of ``study`` read by the flow 10 ms after the previous one (the listener
    accepted it just then)."""
    world.clock.now += 0.01
    at = datetime.fromtimestamp(world.clock.now, UTC)
    event = received(n, study=study, sha=sha).model_copy(update={"occurred_at": at})
    await world.flow.assemble(event.to_bytes(), Origin(InstanceReceivedV1.SCHEMA, headers=COUNTS))
    return event


def test_a_3000_instance_study_costs_its_changelog_a_few_hundred_bytes_an_instance():
    """The whole state written on every instance summed to ~n²/2 instance records, and one
    record passed 1 MB at ~1 770 instances: here every instance costs its entry, whatever the
    study's size, and the header is written with the first instance and when announced
    (measured with these 28-character study UIDs: 429 bytes an entry, 171-203 a header)."""
    world, table = store_world()

    async def run() -> None:
        for n in range(1, 3001):
            await assemble(world, n)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        [ready] = world.ready_events()
        assert len(ready.instances) == 3000
        await world.score(ready)

    asyncio.run(run())
    sizes = table.sizes()
    assert max(sizes) < 512  # not 1.7 MB at the end (Kafka's default limit: 1 MB)
    # The first instance's entry and header, each later one's entry, then the header announced.
    assert [key == KEY for key, _ in table.records] == [False, True] + [False] * 2999 + [True]
    assert sum(sizes) / 3000 < 512  # linear: a constant per instance, not ~n/2 instances
    assert sum(sizes[:2]) > 500  # the first instance's entry and header (the bound is not slack)
    assert world.studies[KEY]["announced"] == 3000


def test_a_new_store_over_the_restored_table_reads_what_the_flow_wrote():
    """A worker restarted (or given the partition) restores the table from its changelog and
    reads every study back as the flow left it: instances, counts, procedure steps, announced,
    parked, a study with a step and no instance yet."""

    async def fail(ready: object) -> InferenceResultV1:
        raise ModelUnavailable("down")

    async def run(world: World) -> None:
        others = [f"{STUDY}.{n}" for n in range(2, 5)]
        await step(world, "IN PROGRESS", STUDY, ())
        for n in (1, 2, 3):
            await assemble(world, n)
        await assemble(world, 2, sha="cd")  # a new version of instance 2
        await step(world, "COMPLETED", STUDY, (1, 2, 3))  # ready at once
        await world.score(world.ready_events()[0])  # announced, steps released
        await assemble(world, 4)  # and one more after
        for n in (1, 2):
            await assemble(world, n, study=others[0])
        world.clock.now += QUIET
        await world.flow.release_ready_studies()
        world.scorer.behaviour = fail
        await world.score(world.ready_events()[-1])  # parked
        await assemble(world, 1, study=others[1])  # waiting
        await step(world, "IN PROGRESS", others[2], ())  # a step, no instance yet

    world, table = store_world()
    plain = World()  # the flow over a plain dict: what the store must be equivalent to
    asyncio.run(run(world))
    asyncio.run(run(plain))
    assert world.metric("scanwatch_worker_studies_parked_total") == 1
    written = dict(world.studies.items())
    assert written == plain.studies and len(written) == 4
    assert all("instances" not in table[key] for key in written)  # headers hold scalars
    assert len(table) > len(written)
    restored = StudyStore(table.restored())
    assert dict(restored.items()) == written
    assert restored[KEY]["steps"]["1.2.3.4"]["released"] is True
    assert restored[KEY]["acquisitions"][f"{STUDY}.1.4"] == [f"{STUDY}.1/1", 3000]
    assert restored[KEY]["instances"][f"{STUDY}.1.2"]["sha256"] == "cd" * 32
    assert restored[f"{STUDY}.2".encode()]["parked_until"] > 0


def test_a_change_writes_its_entries_first_and_the_header_last():
    world, table = store_world()

    async def run() -> None:
        await assemble(world, 1)
        await assemble(world, 1)  # redelivered: nothing written
        await assemble(world, 2)
        await step(world, "IN PROGRESS", STUDY, ())

    asyncio.run(run())
    assert [key for key, _ in table.records] == [
        instance_key(KEY, f"{STUDY}.1.1"),
        KEY,
        instance_key(KEY, f"{STUDY}.1.2"),  # its times in its entry: no header
        step_key(KEY, "1.2.3.4"),  # the step changes no scalar: no header
    ]


def test_a_worker_killed_anywhere_in_the_changelog_loses_no_instance_nor_its_time():
    """Every prefix of the changelog (a crash keeps a prefix of what was sent) reads back as a
    study holding every instance whose entry is in it, and with the newest times of those: an
    entry carries them, since the header is not written again for each instance."""
    world, table = store_world()
    states: list[tuple[int, StudyState]] = []  # after each instance: records sent, the state

    async def run() -> None:
        for n in (1, 2, 3):
            await assemble(world, n)
            states.append((len(table.records), world.studies[KEY]))

    asyncio.run(run())
    assert [length for length, _ in states] == [2, 3, 4]  # entry and header, then entries
    for length in range(1, len(table.records) + 1):
        prefix = table.records[:length]
        store = StudyStore(table.restored(length))
        entries = {key for key, _ in prefix if key != KEY}
        if not any(key == KEY for key, _ in prefix):
            assert list(store) == [] and KEY not in store  # entries without a study yet
            continue
        state = store[KEY]
        assert {instance_key(KEY, uid) for uid in state["instances"]} == entries
    for length, state in states:  # the study as the flow had it, times included
        assert StudyStore(table.restored(length))[KEY] == state
    restored = StudyStore(table.restored())[KEY]
    assert restored["last_received_at"] > table[KEY]["last_received_at"]  # instance 1's header
    assert restored["last_event_at"] == world.studies[KEY]["last_event_at"]
    assert restored["acquisitions"][f"{STUDY}.1.3"] == [f"{STUDY}.1/1", 3000]


def test_the_redelivered_instances_after_the_crash_leave_the_study_due():
    """Killed after the first instance's entry, before the header that makes the study: the
    instance events are redelivered (their offsets were not committed), the study adopts the
    entry, and it is announced with both instances."""
    world, table = store_world()
    asyncio.run(assemble(world, 1))
    asyncio.run(assemble(world, 2))
    world.studies = world.flow.studies = StudyStore(table.restored(1))
    assert KEY not in world.studies

    async def run() -> None:
        await assemble(world, 1)
        await assemble(world, 2)
        world.clock.now += QUIET
        await world.flow.release_ready_studies()

    asyncio.run(run())
    [ready] = world.ready_events()
    assert len(ready.instances) == 2


def test_entries_without_a_header_are_removed_when_the_study_is_written_again():
    table = Table()
    stale = {"ref": received(9).ref().model_dump(mode="json")}
    dict.__setitem__(table, instance_key(KEY, f"{STUDY}.1.9"), stale)  # its header lost
    store = StudyStore(table)
    assert list(store) == [] and len(store) == 0 and store.get(KEY) is None
    state = add_instance(None, received(1), 10.0)
    store[KEY] = state
    assert instance_key(KEY, f"{STUDY}.1.9") not in table
    assert StudyStore(table)[KEY] == state


def old_format_state() -> StudyState:
    """A study as the worker wrote it before the store: the whole state under its key."""
    state = add_step(None, steps_event(), 5.0)
    for n in (1, 2):
        state = add_instance(state, received(n), 10.0 + n, dict(COUNTS))
    return mark_announced(state, 2)


def steps_event() -> ProcedureStepV1:
    return ProcedureStepV1(
        StudyInstanceUID=STUDY,
        procedure_step_uid="1.2.3.4",
        status="COMPLETED",
        step_studies=[STUDY],
        instances=[
            StepInstanceRef(SeriesInstanceUID=STUDY + ".1", SOPInstanceUID=f"{STUDY}.1.{n}")
            for n in (1, 2)
        ],
        calling_ae_title="MR1",
    )


def test_a_study_in_the_old_format_is_read_as_before_and_rewritten_when_it_changes():
    old = old_format_state()
    table = Table({KEY: codecs.loads("json", codecs.dumps("json", old))})
    store = StudyStore(table)
    assert dict(store.items()) == {KEY: old}
    store[KEY] = store[KEY]  # read and handed back: no change, nothing written
    assert table.records == []

    world, _ = store_world()
    world.studies = world.flow.studies = store
    third = asyncio.run(assemble(world, 3))
    expected = add_instance(old, third, world.clock.now, dict(COUNTS))
    assert store[KEY] == expected
    header = table[KEY]
    assert "instances" not in header and "steps" not in header and header["layout"] == 3
    assert set(table) == {
        KEY,
        step_key(KEY, "1.2.3.4"),
        *(instance_key(KEY, f"{STUDY}.1.{n}") for n in (1, 2, 3)),
    }
    assert StudyStore(table.restored())[KEY] == expected
    assert max(table.sizes()) < 1024


def test_derived_keys_are_never_studies():
    world, table = store_world()

    async def run() -> None:
        for n in (1, 2):
            await assemble(world, n)
        await step(world, "IN PROGRESS", STUDY, ())
        await assemble(world, 1, study=STUDY + ".9")

    asyncio.run(run())
    store = StudyStore(table)
    assert sorted(store) == [KEY, (STUDY + ".9").encode()]
    assert len(store) == 2 and len(table) == 6  # 2 headers, 3 instances, 1 step
    assert instance_key(KEY, f"{STUDY}.1.1") not in store
    with pytest.raises(KeyError):
        store[instance_key(KEY, f"{STUDY}.1.1")] = store[KEY]


def test_the_table_is_scanned_once_after_a_reload_not_per_lookup():
    world, table = store_world()

    async def run() -> None:
        for study in range(5):
            for n in (1, 2):
                await assemble(world, n, study=f"{STUDY}.{study}")

    asyncio.run(run())
    table.scans = 0
    store = StudyStore(table)  # a worker restarted over the restored table
    world.studies = world.flow.studies = store
    for _ in range(3):
        for key in list(store):
            assert len(store[key]["instances"]) == 2
        asyncio.run(world.flow.release_ready_studies())  # each timer pass reads every study
    assert table.scans == 1
    store.reload()  # the app's recovery callback
    assert len(store) == 5 and table.scans == 2


def test_the_timer_looks_only_at_studies_with_instances_to_announce():
    """A week of scored studies stays in the table (the retention period); the timer's pass,
    four times a second, must not read them all. The store keeps the pending set through its
    writes, a park and a removal, and finds it again from the table after a reload."""
    world, table = store_world()
    store = world.flow.studies
    scored = [f"{STUDY}.{n}".encode() for n in range(50)]
    for key in scored:
        store[key] = mark_announced(add_instance(None, received(1, study=key.decode()), 1.0), 1)
    waiting = (STUDY + ".77").encode()
    store[waiting] = add_instance(None, received(1, study=waiting.decode()), 1.0)
    assert store.pending() == [waiting]

    looked_at: list[bytes] = []
    known = store._known

    def spy(key: bytes) -> Any:
        looked_at.append(key)
        return known(key)

    store._known = spy  # type: ignore[method-assign]
    asyncio.run(world.flow.release_ready_studies())
    assert set(looked_at) == {waiting}

    store._known = known  # type: ignore[method-assign]
    store[scored[0]] = park(store[scored[0]], until=2.0)  # a transient failure: due again
    assert store.pending() == [waiting, scored[0]]  # in the order they became pending
    store[waiting] = mark_announced(store[waiting], 1)
    del store[scored[0]]
    assert store.pending() == []
    store[scored[1]] = add_instance(store[scored[1]], received(2, study=scored[1].decode()), 3.0)
    restarted = StudyStore(table.restored())  # another worker's store over the changelog
    assert restarted.pending() == [scored[1]]
    store.reload()
    assert store.pending() == [scored[1]]


def test_a_removed_study_leaves_no_key_behind():
    table = Table()
    store = StudyStore(table)
    store[KEY] = old_format_state()
    del store[KEY]
    assert dict(table) == {} and KEY not in store and list(store) == []


def _flow_cases() -> list[Any]:
    """Every test of test_worker_flow.py, each parametrization of it a case of its own."""
    cases = []
    for name, test in sorted(vars(test_worker_flow).items()):
        if not name.startswith("test_") or not callable(test):
            continue
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            cases.append(pytest.param(test, {}, id=name))
            continue
        [mark] = marks
        argname, values = mark.args
        for n, value in enumerate(values):
            cases.append(pytest.param(test, {argname: value}, id=f"{name}[{n}]"))
    return cases


@pytest.mark.parametrize(("test", "kwargs"), _flow_cases())
def test_the_flow_behaves_the_same_over_the_store(test, kwargs, monkeypatch):
    """The flow's own tests, with the study table in the store's layout instead of a dict."""
    made = World.__init__

    def over_the_store(self: World, *args: Any, **settings: Any) -> None:
        made(self, *args, **settings)
        self.studies = self.flow.studies = StudyStore(Table())  # type: ignore[assignment]

    monkeypatch.setattr(World, "__init__", over_the_store)
    test(**kwargs)


def test_an_instance_removed_leaves_the_newest_times_in_the_header():
    """The newest times ride in the newest instance's entry: removing that entry (a study cut
    short) rewrites the header with them, so a restored study keeps them."""
    table = Table()
    store = StudyStore(table)
    state = None
    for n in (1, 2, 3):
        state = add_instance(state, received(n), 10.0 + n)
        store[KEY] = state
    assert state is not None
    cut = StudyState(**state)
    cut["instances"] = {
        uid: ref for uid, ref in state["instances"].items() if uid != f"{STUDY}.1.3"
    }
    store[KEY] = cut
    assert table[KEY]["last_received_at"] == 13.0
    assert StudyStore(table.restored())[KEY] == cut
