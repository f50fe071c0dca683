"""The file store's layout, written once: which stored files are instances and which version wins.

``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` holds the first version
of an instance; a later version with other content lies beside it as ``<SOP>.v<N>.dcm``
(N ≥ 2), and the highest N is the instance's current content. UIDs hold only digits and dots
(PS3.5 §9.1), so they are safe path components and the names cannot collide.

The listener writes this layout (``dicom_listener.adapters.filestore``), the console's index
reads it (``services.console.index``) and the worker writes its derived series (the heatmaps)
into it. Standard library only: the listener's image carries nothing heavier.
"""

from __future__ import annotations

import re
from pathlib import Path

#: A DICOM UID (PS3.5 §9.1): digits and dots; checked wherever a UID becomes a path component.
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: The longest UID PS3.5 allows.
UID_MAX = 64
#: ``<SOP>.dcm`` (version 1) or ``<SOP>.v<N>.dcm``; the SOP part is lazy so ``.v2`` is the version.
FILE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)*?)(?:\.v([0-9]+))?\.dcm$")


def is_uid(value: str) -> bool:
    """Whether ``value`` is a DICOM UID (digits and dots, at most 64 characters)."""
    # fullmatch: ``$`` would also match before a trailing newline ("1.2\n" is no UID).
    return len(value) <= UID_MAX and UID_RE.fullmatch(value) is not None


def check_uid(name: str, value: str) -> None:
    """Raise ``ValueError`` naming ``name`` (a DICOM keyword) when ``value`` is not a UID."""
    if not is_uid(value):
        raise ValueError(f"{name} is not a valid UID")


def instance_file_name(sop_uid: str, version: int = 1) -> str:
    """``<SOP>.dcm`` for the first version, ``<SOP>.v<N>.dcm`` for later ones."""
    return f"{sop_uid}.dcm" if version <= 1 else f"{sop_uid}.v{version}.dcm"


def parse_file_name(name: str) -> tuple[str, int] | None:
    """``(SOPInstanceUID, version)`` of a stored file's name; ``None`` for anything else."""
    match = FILE_RE.fullmatch(name)
    if match is None or not is_uid(match.group(1)):
        return None
    return match.group(1), int(match.group(2) or 1)


def series_folder(root: Path, study_uid: str, series_uid: str) -> Path:
    """``<root>/<Study>/<Series>``; raises ``ValueError`` on a malformed UID."""
    check_uid("StudyInstanceUID", study_uid)
    check_uid("SeriesInstanceUID", series_uid)
    return Path(root) / study_uid / series_uid


def instance_path(
    root: Path, study_uid: str, series_uid: str, sop_uid: str, version: int = 1
) -> Path:
    """Where ``version`` of an instance lies; raises ``ValueError`` on a malformed UID."""
    check_uid("SOPInstanceUID", sop_uid)
    return series_folder(root, study_uid, series_uid) / instance_file_name(sop_uid, version)
