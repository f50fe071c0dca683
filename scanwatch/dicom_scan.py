"""A fast structural scan of a received Part 10 file: the identifying values, and whether every
element's declared length fits in the bytes received.

pydicom builds a ``Dataset`` of every element to answer the same question, which was a sixth of
the listener's time per instance. This walks element headers only (through ``mmap``: a 500 MB
multi-frame is not read into memory), keeps the few values asked for, and descends into
undefined-length sequences and encapsulated pixel data to find where they end. It handles the
little-endian transfer syntaxes (implicit and explicit VR, native and encapsulated); the
caller uses pydicom for big endian and deflate.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_DELIMITERS = frozenset((_ITEM, _ITEM_END, _SEQUENCE_END))
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
#: What the scan walks: a mapped file, or the bytes the association kept in memory.
_Buffer = mmap.mmap | bytes | bytearray
#: Nesting depth beyond which a dataset is called undecodable (no real IOD comes close).
_MAX_DEPTH = 32


class Truncated(ValueError):
    """An element, item or sequence runs past the end of the received bytes."""


class Undecodable(ValueError):
    """The bytes are not a dataset in the transfer syntax they were sent with."""


class _Walker:
    def __init__(
        self,
        buf: _Buffer,
        explicit: bool,
        wanted: frozenset[int],
        placed: frozenset[int] = frozenset(),
    ) -> None:
        self.buf = buf
        self.size = len(buf)
        self.explicit = explicit
        self.wanted = wanted
        self.watched = wanted | placed
        self.values: dict[int, bytes] = {}
        #: (value offset, value length) of each watched top-level element found.
        self.places: dict[int, tuple[int, int]] = {}

    def _header(self, offset: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, value offset) of the element at ``offset``."""
        if offset + 8 > self.size:
            raise Truncated(offset)
        group, element = _TAG.unpack_from(self.buf, offset)
        tag = (group << 16) | element
        # Only the item and delimitation tags go without a VR; any other tag of group FFFE
        # (none is defined) is an element with a VR, as pydicom reads it.
        if tag in _DELIMITERS or not self.explicit:
            return tag, None, _U32.unpack_from(self.buf, offset + 4)[0], offset + 8
        vr = bytes(self.buf[offset + 4 : offset + 6])
        if vr in _LONG_VRS:
            if offset + 12 > self.size:
                raise Truncated(offset)
            return tag, vr, _U32.unpack_from(self.buf, offset + 8)[0], offset + 12
        if not _vr_shaped(vr):
            raise Undecodable(f"no VR at offset {offset}")
        return tag, vr, _U16.unpack_from(self.buf, offset + 6)[0], offset + 8

    def dataset(self, offset: int, depth: int, end: int | None = None) -> int:
        """Walk elements from ``offset`` to ``end`` (or to the item delimiter when ``end`` is
        None); return the offset after them."""
        if depth > _MAX_DEPTH:
            raise Undecodable("sequences nested too deeply")
        limit = self.size if end is None else end
        while offset < limit:
            tag, vr, length, value = self._header(offset)
            if tag == _ITEM_END:
                if end is not None or depth == 0:
                    raise Undecodable(f"item delimiter at offset {offset}")
                return value
            if depth == 0 and tag in self.watched:
                self.places[tag] = (value, length)
            if length == _UNDEFINED:
                if vr is not None and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise Undecodable(f"undefined length for VR {vr!r}")
                if depth == 0 and tag in self.wanted:  # a UID or a code string: never so
                    raise Undecodable(f"undefined length for wanted tag {tag:08X}")
                offset = self._sequence(value, depth + 1)
                continue
            offset = value + length
            if offset > limit:
                raise Truncated(value)
            if depth == 0 and tag in self.wanted:
                self.values[tag] = bytes(self.buf[value:offset])
        if end is None and depth > 0:
            raise Truncated(offset)  # an undefined-length item without its delimiter
        return offset

    def _sequence(self, offset: int, depth: int) -> int:
        """Items until the sequence delimiter (a sequence, or encapsulated pixel data)."""
        while True:
            if offset + 8 > self.size:
                raise Truncated(offset)
            group, element = _TAG.unpack_from(self.buf, offset)
            length = _U32.unpack_from(self.buf, offset + 4)[0]
            tag = (group << 16) | element
            offset += 8
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM:
                raise Undecodable(f"expected an item at offset {offset - 8}")
            if length == _UNDEFINED:
                offset = self.dataset(offset, depth)
            else:
                if offset + length > self.size:
                    raise Truncated(offset)
                offset += length


def dataset_offset(buf: _Buffer) -> int:
    """Where the dataset starts in a Part 10 file (after the preamble and File Meta)."""
    return _file_meta(buf)[0]


def _file_meta(buf: _Buffer) -> tuple[int, bytes]:
    """Where the dataset starts in a Part 10 file, and the File Meta's Transfer Syntax UID."""
    if len(buf) < 144 or buf[128:132] != b"DICM" or buf[132:136] != b"\x02\x00\x00\x00":
        raise Undecodable("not a Part 10 file")
    meta_length: int = _U32.unpack_from(buf, 140)[0]  # File Meta Information Group Length
    end = 144 + meta_length
    # The group length is checked against the group's own elements (explicit VR little
    # endian, PS3.10 7.1), which must end exactly there: a wrong one would start the walk
    # inside an element, or past the end, and read values that are not the dataset's.
    offset = 144
    syntax = b""
    while offset < end:
        if offset + 8 > len(buf) or _TAG.unpack_from(buf, offset)[0] != 0x0002:
            raise Undecodable("File Meta group length does not match its elements")
        element = _TAG.unpack_from(buf, offset)[1]
        if bytes(buf[offset + 4 : offset + 6]) in _LONG_VRS:
            if offset + 12 > len(buf):
                raise Undecodable("File Meta ends inside an element")
            offset += 12 + _U32.unpack_from(buf, offset + 8)[0]
        else:
            length = _U16.unpack_from(buf, offset + 6)[0]
            if element == 0x0010:  # Transfer Syntax UID (UI: a short VR)
                syntax = bytes(buf[offset + 8 : offset + 8 + length])
            offset += 8 + length
    if offset != end or (end + 2 <= len(buf) and _U16.unpack_from(buf, end)[0] == 0x0002):
        raise Undecodable("File Meta group length does not match its elements")
    return end, syntax


def _walk(buf: _Buffer, explicit_vr: bool, wanted: frozenset[int]) -> dict[int, bytes]:
    walker = _Walker(buf, explicit_vr, wanted)
    start = dataset_offset(buf)
    if not explicit_vr and _looks_explicit(buf, start):
        # Explicit VR sent as implicit (some senders do): pydicom reads it so, with a warning.
        raise Undecodable("explicit VR where implicit VR was negotiated")
    walker.dataset(start, 0)
    return walker.values


def _looks_explicit(buf: _Buffer, offset: int) -> bool:
    """pydicom's test of a dataset's encoding: the first element's bytes 4–5 are shaped like a
    VR (as an implicit VR length, they would be at least 16 705 bytes)."""
    return _vr_shaped(bytes(buf[offset + 4 : offset + 6]))


def _vr_shaped(vr: bytes) -> bool:
    """Two capital letters, as every VR is."""
    return len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90


def scan_part10(
    source: Path | bytes | bytearray, explicit_vr: bool, wanted: frozenset[int]
) -> dict[int, bytes]:
    """The raw values of the ``wanted`` top-level tags of a little-endian Part 10 file, given
    as its path or its bytes.

    Raises :class:`Truncated` or :class:`Undecodable`.
    """
    if not isinstance(source, Path):
        return _walk(source, explicit_vr, wanted)
    with open(source, "rb", buffering=0) as fp:
        if fp.seek(0, 2) == 0:
            raise Undecodable("empty file")
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(buf, explicit_vr, wanted)


#: The little-endian transfer syntaxes the scan reads, and whether each has explicit VRs.
_SCANNED_SYNTAXES = {
    "1.2.840.10008.1.2": False,  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": True,  # Explicit VR Little Endian
}


@dataclass(frozen=True)
class Scanned:
    """What :func:`scan_file` found in a Part 10 file's top-level dataset."""

    transfer_syntax: str
    #: The raw values of the wanted elements found with a defined length.
    values: dict[int, bytes]
    #: (value offset in the file, value length) of each wanted or placed element found; the
    #: length is 0xFFFFFFFF for an undefined-length one (a sequence, encapsulated pixel data).
    places: dict[int, tuple[int, int]]


def scan_file(path: Path, wanted: frozenset[int], placed: frozenset[int]) -> Scanned:
    """The ``wanted`` top-level values of a Part 10 file, and where its ``placed`` elements
    lie (their values are not read: pixel data), for a file in a native little-endian transfer
    syntax (the one its File Meta names).

    Raises :class:`Truncated`, or :class:`Undecodable` (also for any other transfer syntax:
    the caller reads those with pydicom)."""
    with open(path, "rb", buffering=0) as fp:
        if fp.seek(0, 2) == 0:
            raise Undecodable("empty file")
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            start, raw_syntax = _file_meta(buf)
            syntax = raw_syntax.rstrip(b"\x00 ").decode("ascii", "replace")
            explicit = _SCANNED_SYNTAXES.get(syntax)
            if explicit is None:
                raise Undecodable(f"transfer syntax {syntax!r} is not scanned")
            walker = _Walker(buf, explicit, wanted, placed)
            walker.dataset(start, 0)
            return Scanned(syntax, walker.values, walker.places)
