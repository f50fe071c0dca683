"""The study table's layout: a study kept as a header and one entry per instance and per step.

:class:`~inference_worker.flow.WorkerFlow` reads and writes whole
:class:`~inference_worker.assembly.StudyState` values. Written as one table value, each change
would send the whole study to the table's changelog: the sum of a study's records grew with the
square of its instances (38 instances: ~420 KB) and one record passed Kafka's 1 MB limit at
about 1 770 instances, after which the worker could not record the study at all.
:class:`StudyStore` keeps the flow's view and splits each study over several table keys::

    <study>                     header: the state's scalars (times, counts, source, parking)
    <study> NUL i NUL <SOP UID> one instance: its InstanceRef, its acquisition if known, and
                                the study's two newest times when it was written
    <study> NUL s NUL <step UID> one procedure step

and writes only the keys whose value changed, so an instance costs its own entry, whatever the
study's size. The two scalars that every instance changes (``last_received_at``,
``last_event_at``) travel in the instance's entry: the header is written only when anything else
of the study changes (its first instance, an announcement, parking), and reading takes the
newest of each over the header and the entries. (Written with every instance, the header was a
second changelog record per instance: a third of the worker's CPU per instance went to the
table's writes, and a third of the broker's records to the header.) Derived keys hold a NUL,
which no UID does (PS3.5 9.1): they are never taken for studies, and iterating the store yields
studies only.

Ordering, so that a worker killed at any point loses nothing: a change writes its entries
first and the header last, and reading trusts the entries for the instance and step sets (a
changelog keeps a prefix of what one partition's producer sent). A study exists once its
header does; entries without one (a first instance whose header was lost) belong to nobody
until the study is written again, which adopts or removes them. Every key of a study is
written from the agent handling that study's event, and Faust sends a table write to the
changelog partition of the event being handled (``Collection.partition_for_key`` returns
``current_event().message.partition``; the key is not hashed), so a study's keys share one
partition and are restored, and dropped on a rebalance, together.

The store remembers what the table holds for each study it has read or written (so a read is
one dictionary lookup, and a write compares against it). That index is built by one pass over
the table's keys when first needed; :meth:`StudyStore.reload` forgets it, which the app does
once a rebalance's recovery has restored the table from its changelog. It also keeps the set
of studies with instances never announced (:meth:`StudyStore.pending`), so that the worker's
timer, four times a second, looks at those and not at every study of the retention period.

A header written before this layout (the whole state under the study's key, ``instances``
included) is read as it is, with any entries over it, and rewritten in this layout the next
time the study changes.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, cast

from inference_worker.assembly import StepState, StudyState, has_unannounced

#: Marks a derived key (a study's instance or step entry): no UID holds a NUL.
SEPARATOR = b"\x00"
INSTANCE = SEPARATOR + b"i" + SEPARATOR
STEP = SEPARATOR + b"s" + SEPARATOR
#: The header's ``layout`` in this format (an older header has none, and holds ``instances``;
#: layout 2 kept the newest times in the header only, which layout 3 reads as it is).
LAYOUT = 3
#: The state's parts kept in entries rather than in the header.
_SPLIT = frozenset({"instances", "acquisitions", "steps"})
#: The scalars every new instance changes: written in its entry, and in the header only when
#: the header is written for another change; the newest over both is the study's.
_NEWEST = ("last_received_at", "last_event_at")


def instance_key(study: bytes, sop_instance_uid: str) -> bytes:
    """The table key of one instance's entry."""
    return study + INSTANCE + sop_instance_uid.encode()


def step_key(study: bytes, procedure_step_uid: str) -> bytes:
    """The table key of one procedure step's entry."""
    return study + STEP + procedure_step_uid.encode()


def is_study_key(key: bytes) -> bool:
    """Whether ``key`` is a study's own key (its header), not one of its entries."""
    return SEPARATOR not in key


class _Study:
    """What the table holds for one study, as this store last read or wrote it."""

    __slots__ = ("header", "refs", "acquisitions", "steps", "newest", "state", "unread")

    def __init__(self) -> None:
        self.header: dict[str, Any] | None = None  # the value under the study's key
        self.refs: dict[str, dict[str, Any]] = {}  # SOPInstanceUID -> its entry's InstanceRef
        self.acquisitions: dict[str, list[Any]] = {}  # SOPInstanceUID -> its entry's acquisition
        self.steps: dict[str, StepState] = {}  # step UID -> its entry
        self.newest: dict[str, float] = {}  # of _NEWEST: the newest value its entries hold
        self.state: StudyState | None = None  # the state these make (None: not assembled yet)
        #: Entry keys found by the index and not read yet (read on the study's first lookup).
        self.unread: list[bytes] = []


def _changed(new: Mapping[str, Any], old: Mapping[str, Any]) -> list[str]:
    """The keys of ``new`` whose value is not ``old``'s. Values the flow did not touch are the
    same objects (the assembly's functions copy a map and add to it), so identity, tested at C
    speed, leaves only the few to compare."""
    if new is old:
        return []
    differ = map(operator.is_not, new.values(), map(old.get, new))
    return [key for key in itertools.compress(new, differ) if old.get(key) != new[key]]


def _header_differs(header: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether ``header`` says more than ``old`` (the one in the table) apart from the newest
    times, which the entries carry."""
    if old is None or header.keys() != old.keys():
        return True
    return any(old[key] != value for key, value in header.items() if key not in _NEWEST)


class StudyStore(MutableMapping[bytes, StudyState]):
    """The flow's ``MutableMapping[bytes, StudyState]`` over the study table (a Faust table,
    or any mapping standing in for one): see the module's docstring for the layout."""

    def __init__(self, table: MutableMapping[bytes, Any]) -> None:
        self.table = table
        self._studies: dict[bytes, _Study] | None = None
        #: Insertion-ordered (a dict, not a set), so that a pass announces studies in the order
        #: they came, as it did when it went over the whole table. None: not known since the
        #: last reload.
        self._pending: dict[bytes, None] | None = None

    def reload(self) -> None:
        """Forget what was read: the table changed behind this store (restored from its
        changelog after a rebalance). The next access indexes it again."""
        self._studies = None
        self._pending = None

    def pending(self) -> list[bytes]:
        """The studies with instances never announced (parked ones included): after a reload
        found by reading every study, then kept up to date by this store's writes."""
        if self._pending is None:
            self._pending = {key: None for key, state in self.items() if has_unannounced(state)}
        return list(self._pending)

    # -- reading -------------------------------------------------------------------------------
    def _index(self) -> dict[bytes, _Study]:
        """Every study the table holds, by one pass over its keys (entries read lazily)."""
        if self._studies is None:
            studies: dict[bytes, _Study] = {}
            for key in list(self.table.keys()):
                study = key.partition(SEPARATOR)[0]
                known = studies.get(study)
                if known is None:
                    known = studies[study] = _Study()
                if key == study:
                    known.header = self.table[key]
                else:
                    known.unread.append(key)
            self._studies = studies
        return self._studies

    def _known(self, key: bytes) -> _Study | None:
        """The study under ``key``, assembled; None where it has no header."""
        known = self._index().get(key)
        if known is None or known.header is None:
            return None
        if known.state is None:
            self._read_entries(key, known)
            known.state = self._assemble(known)
        return known

    def _read_entries(self, key: bytes, known: _Study) -> None:
        for entry_key in known.unread:
            value = self.table.get(entry_key)
            if value is None:
                continue
            name = entry_key[len(key) + len(INSTANCE) :].decode()  # STEP is as long
            if entry_key.startswith(key + STEP):
                known.steps[name] = cast(StepState, value)
            elif entry_key.startswith(key + INSTANCE):
                known.refs[name] = value["ref"]
                if "acquisition" in value:
                    known.acquisitions[name] = value["acquisition"]
                for field in _NEWEST:
                    if field in value:
                        known.newest[field] = max(value[field], known.newest.get(field, 0.0))
        known.unread = []

    @staticmethod
    def _assemble(known: _Study) -> StudyState:
        """The flow's state from a header and the entries: the entries decide the instance and
        step sets (they are written first), over what an older header holds."""
        header = dict(cast(dict[str, Any], known.header))
        header.pop("layout", None)
        instances = {**header.pop("instances", {}), **known.refs}
        acquisitions = {**header.pop("acquisitions", {}), **known.acquisitions}
        steps = {**header.pop("steps", {}), **known.steps}
        for field, newest in known.newest.items():
            header[field] = max(header.get(field, newest), newest)
        state = cast(StudyState, {**header, "instances": instances})
        if acquisitions:
            state["acquisitions"] = acquisitions
        if steps:
            state["steps"] = steps
        return state

    def __getitem__(self, key: bytes) -> StudyState:
        known = self._known(key)
        if known is None or known.state is None:
            raise KeyError(key)
        return known.state

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._known(key) is not None

    def __iter__(self) -> Iterator[bytes]:
        return iter([key for key, known in self._index().items() if known.header is not None])

    def __len__(self) -> int:
        return sum(known.header is not None for known in self._index().values())

    # -- writing -------------------------------------------------------------------------------
    def __setitem__(self, key: bytes, state: StudyState) -> None:
        """Write what changed of the study: its new or changed instance and step entries, then
        its header (see the module's docstring for why in this order)."""
        if not is_study_key(key):
            raise KeyError(f"not a study key: {key!r}")
        known = self._known(key)
        if known is None:  # new, or entries without a header: theirs to adopt or remove
            known = self._index().setdefault(key, _Study())
            self._read_entries(key, known)
        elif known.state is state:
            return  # the state read, handed back unchanged (a redelivered event)
        changed = _changed(state["instances"], known.refs) + _changed(
            state.get("acquisitions", {}), known.acquisitions
        )
        self._write_instances(key, known, state, changed)
        # Every key of the state is now known: equal sizes mean nothing else is (the set
        # differences cost a pass over the study, which a growing study need not pay).
        acquisitions = state.get("acquisitions", {})
        if len(known.acquisitions) != len(acquisitions):  # one dropped: its entry without it
            dropped = known.acquisitions.keys() - acquisitions.keys()
            self._write_instances(key, known, state, list(dropped))
        refs = state["instances"]
        # An instance removed (none but in a study cut short) may take the newest times with
        # its entry: the header then keeps them.
        removed = len(known.refs) != len(refs)
        if removed:
            for uid in known.refs.keys() - refs.keys():
                del self.table[instance_key(key, uid)]
                del known.refs[uid]
                known.acquisitions.pop(uid, None)
        steps = state.get("steps", {})
        for uid in _changed(steps, known.steps):
            self.table[step_key(key, uid)] = known.steps[uid] = steps[uid]
        for uid in known.steps.keys() - steps.keys():
            del self.table[step_key(key, uid)]
            del known.steps[uid]
        header = {"layout": LAYOUT, **{k: v for k, v in state.items() if k not in _SPLIT}}
        if removed or _header_differs(header, known.header):
            self.table[key] = header
            known.header = header
        known.state = state
        if self._pending is not None:
            if has_unannounced(state):
                self._pending.setdefault(key)
            else:
                self._pending.pop(key, None)

    def _write_instances(
        self, key: bytes, known: _Study, state: StudyState, uids: list[str]
    ) -> None:
        """Write the entries of ``uids`` as the state has them (in its order: a study restored
        from the memory store lists its instances in the order their entries were first
        written), each with the state's newest times (which only a new or changed instance
        moves, so an entry is written whenever they change)."""
        refs = state["instances"]
        acquisitions = state.get("acquisitions", {})
        newest = {field: state[field] for field in _NEWEST if field in state}  # type: ignore[literal-required]
        for uid in dict.fromkeys(uids):
            if uid not in refs:
                continue  # an acquisition is kept with its instance only
            entry: dict[str, Any] = {"ref": refs[uid], **newest}
            if uid in acquisitions:
                entry["acquisition"] = acquisitions[uid]
            self.table[instance_key(key, uid)] = entry
            known.refs[uid] = refs[uid]
            if uid in acquisitions:
                known.acquisitions[uid] = acquisitions[uid]
            else:
                known.acquisitions.pop(uid, None)

    def __delitem__(self, key: bytes) -> None:
        """Remove the study: its header first (the study is gone at once), then its entries
        (any left behind by a crash are removed when the study is next written)."""
        known = self._known(key)
        if known is None:
            raise KeyError(key)
        del self.table[key]
        for uid in sorted(known.refs):
            del self.table[instance_key(key, uid)]
        for uid in sorted(known.steps):
            del self.table[step_key(key, uid)]
        del self._index()[key]
        if self._pending is not None:
            self._pending.pop(key, None)
