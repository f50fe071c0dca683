"""Value encoding rules shared by the PDU, DIMSE and file meta codecs (PS3.5 6.2, 7.1)."""

from __future__ import annotations


def decode_uid(raw: bytes | memoryview) -> str:
    """A UI value as text, without its NUL (or stray space) padding."""
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


def pad_even(value: bytes, pad: bytes) -> bytes:
    """``value`` padded to an even length (PS3.5 7.1): NUL for UI, space for text VRs."""
    return value + pad if len(value) % 2 else value
