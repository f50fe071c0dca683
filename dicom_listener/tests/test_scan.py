"""The fast structural scan against pydicom as the oracle, on pydicom's own test files."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scanwatch.dicom_scan import Truncated, Undecodable, scan_part10

TAGS = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018, "Modality": 0x00080060,
        "StudyInstanceUID": 0x0020000D}  # fmt: skip
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def little_endian_files() -> list[Path]:
    """Part 10 files among pydicom's test files whose transfer syntax is little endian and not
    deflated (what the scan handles), read in full by pydicom without complaint."""
    found = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                ds.get("SOPInstanceUID")
        except Exception:  # noqa: BLE001, S112 - not a readable file: not an oracle case
            continue
        ts = ds.file_meta.get("TransferSyntaxUID")
        if ts is not None and ts.is_little_endian and not ts.is_deflated:
            found.append(path)
    return found


FILES = little_endian_files()


def scan(path: Path, explicit: bool, wanted: frozenset[int]) -> dict[int, bytes]:
    """``scan_part10`` of the file, checked to give the same answer from its bytes in memory
    (as the listener scans instances it kept in memory)."""
    try:
        values = scan_part10(path, explicit, wanted)
    except (Truncated, Undecodable) as exc:
        with pytest.raises(type(exc)):
            scan_part10(path.read_bytes(), explicit, wanted)
        raise
    assert scan_part10(path.read_bytes(), explicit, wanted) == values
    return values


def test_the_corpus_has_sequences_and_encapsulated_pixel_data() -> None:
    assert len(FILES) > 40
    assert any(pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed for p in FILES)


#: Files the scan refuses, and why: truncated ones, and encodings it leaves to pydicom (the
#: listener falls back to pydicom on Undecodable).
ODD = {
    "MR_truncated.dcm": Truncated,
    "rtplan_truncated.dcm": Truncated,
    "SC_rgb_jpeg.dcm": Undecodable,  # says explicit VR, is implicit VR
    "UN_sequence.dcm": Undecodable,  # an implicit VR sequence inside UN
    "no_meta_group_length.dcm": Undecodable,  # File Meta without its group length
}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_values_match_pydicom(path: Path) -> None:
    ds = pydicom.dcmread(path)
    explicit = ds.file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
    if path.name in ODD:
        with pytest.raises(ODD[path.name]):
            scan(path, explicit, frozenset(TAGS.values()))
        return
    values = scan(path, explicit, frozenset(TAGS.values()))
    for keyword, tag in TAGS.items():
        expected = str(ds.get(keyword, "") or "").strip()
        got = values.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace").strip()
        assert got == expected, keyword


def test_every_cut_of_a_file_is_truncated_or_undecodable(tmp_path: Path) -> None:
    """Cut an MR file (explicit VR) and a file with undefined-length sequences at many points:
    never accepted as complete unless the cut falls between top-level elements."""
    for name in ("MR_small.dcm", "rtplan.dcm"):
        data = (TEST_FILES / name).read_bytes()
        ds = pydicom.dcmread(TEST_FILES / name)
        explicit = ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        for cut in range(len(data) - 1, 300, -max(1, len(data) // 97)):
            path = tmp_path / f"{name}.{cut}"
            path.write_bytes(data[:cut])
            try:
                scan(path, explicit, frozenset())
            except (Truncated, Undecodable):
                continue
            # Accepted: then the cut must leave whole top-level elements only, which pydicom
            # reads without running out of bytes.
            complete = pydicom.dcmread(path, force=True)
            assert all(
                e.value_tell + e.length <= cut
                for e in complete._dict.values()
                if e.length != 0xFFFFFFFF and e.value_tell is not None
            ), (name, cut)


def test_not_a_part10_file_is_undecodable(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello" * 100)
    with pytest.raises(Undecodable):
        scan(path, True, frozenset())


def test_a_group_fffe_tag_that_is_no_delimiter_is_read_with_its_vr_as_pydicom_does(
    tmp_path: Path,
) -> None:
    """The fuzzer's finding of 2026-12-06 (first seen in CI at stop 27, unreproduced until
    then): a (FFFE,4954) element with the VR "CM" in an explicit VR file. The scan read every
    FFFE tag as an item (a 4-byte length, no VR), ran past the end and called a file truncated
    that pydicom reads whole. Only the item and delimitation tags go without a VR."""
    data = bytearray((TEST_FILES / "MR_small.dcm").read_bytes())
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    at = data.index(b"\x08\x00\x18\x00UI")  # the SOP Instance UID's header
    data[at:at] = b"\xfe\xff\x54\x49CM\x00\x00"  # (FFFE,4954), VR CM, length 0
    path = tmp_path / "fffe.dcm"
    path.write_bytes(bytes(data))
    values = scan(path, True, frozenset(TAGS.values()))
    oracle = pydicom.dcmread(path)
    assert values[TAGS["SOPInstanceUID"]].rstrip(b"\0").decode() == oracle.SOPInstanceUID
    assert values[TAGS["StudyInstanceUID"]].rstrip(b"\0").decode() == oracle.StudyInstanceUID


def test_explicit_vr_sent_as_implicit_is_left_to_pydicom(tmp_path: Path) -> None:
    """Some senders encode explicit VR under an implicit VR transfer syntax. pydicom notices (the
    first element's VR bytes are two capital letters) and reads it explicitly; the scan read
    the VR and length as a 4-byte length and called it truncated, and the listener refused an
    instance pydicom reads. Now it is undecodable for the scan: the listener asks pydicom."""
    path = tmp_path / "explicit.dcm"
    path.write_bytes((TEST_FILES / "MR_small.dcm").read_bytes())  # explicit VR little endian
    with pytest.raises(Undecodable, match="explicit VR"):
        scan(path, False, frozenset(TAGS.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pydicom.dcmread(path).SOPInstanceUID  # what the listener falls back to


def test_a_wanted_tag_of_undefined_length_is_left_to_pydicom(tmp_path: Path) -> None:
    """The third finding of 2026-12-06: a SOP Instance UID encoded as OB of undefined length
    (items and a sequence delimiter). The scan walked past it and reported no value, so the
    listener would have called the UID missing; pydicom reads the items as its value. A UID
    is never of undefined length: the scan leaves such a file to pydicom, which the listener
    then refuses for an invalid UID."""
    data = bytearray((TEST_FILES / "MR_small.dcm").read_bytes())
    at = data.index(b"\x08\x00\x18\x00UI")  # the SOP Instance UID's header
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    items = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data[at : at + 8 + length] = b"\x08\x00\x18\x00OB\x00\x00\xff\xff\xff\xff" + items
    path = tmp_path / "ob-uid.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(Undecodable, match="00080018"):
        scan(path, True, frozenset(TAGS.values()))
    assert scan(path, True, frozenset()) == {}  # not wanted: walked over, as before
