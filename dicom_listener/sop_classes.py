"""Which Storage SOP Classes and transfer syntaxes the listener accepts."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import sop_class
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

#: Value of ``sop_classes`` that accepts every Storage SOP Class pynetdicom knows.
ALL_STORAGE = "ALL_STORAGE"
#: Default accepted Storage SOP Classes (keywords, PS3.6 Annex A): the pipeline scores MR.
MR_STORAGE_CLASSES = (
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "EnhancedMRColorImageStorage",
    "MRSpectroscopyStorage",
    "LegacyConvertedEnhancedMRImageStorage",
)
#: Transfer syntaxes accepted for every storage class: stored as received, never transcoded.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def all_storage_classes() -> list[UID]:
    """Every Storage SOP Class pynetdicom knows (PS3.4 Annex B.5)."""
    known = [UID(str(v)) for v in vars(sop_class).values() if isinstance(v, UID)]
    return [uid for uid in dict.fromkeys(known) if uid_to_service_class(uid) is StorageServiceClass]


def resolve_storage_classes(entries: Iterable[str]) -> list[UID]:
    """Keywords (``MRImageStorage``), UIDs or ``ALL_STORAGE`` → SOP Class UIDs, in order.

    Raises ``ValueError`` naming every entry that is neither a known keyword nor a UID.
    """
    resolved: list[UID] = []
    unknown: list[str] = []
    for entry in entries:
        if entry == ALL_STORAGE:
            resolved.extend(all_storage_classes())
            continue
        value = getattr(sop_class, entry, None) if not entry[:1].isdigit() else UID(entry)
        if value is None or not UID(str(value)).is_valid:
            unknown.append(entry)
        else:
            resolved.append(UID(str(value)))
    if unknown:
        raise ValueError(
            f"unknown SOP classes {unknown}: use keywords such as MRImageStorage, "
            f"UIDs, or {ALL_STORAGE}"
        )
    return list(dict.fromkeys(resolved))
