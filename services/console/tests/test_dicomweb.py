"""DICOMweb as an outside viewer speaks it: dicomweb-client's DICOMwebClient against the
console served on loopback, over a store the listener's own FileStore filled with real MR
data (the bundled sample study, pydicom's MR test files: native, RLE, JPEG 2000, multi-frame).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file

from devtools.testing import served
from dicom_listener.adapters.filestore import FileStore
from scanwatch.sample import build_mr_study
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.console.app import create_app
from services.console.config import Settings
from services.console.tests.helpers import put, relabelled

SYSTEM_READ = (Scope("system", "*", "read"),)


@dataclass
class Served:
    url: str
    store: FileStore
    files: dict[str, list[Path]]  # by name: the stored paths
    tokens: TokenService

    def token(self, *scopes: Scope, patient: str | None = None) -> str:
        return self.tokens.issue("test-client", scopes or SYSTEM_READ, patient)[0]

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(
            f"{self.url}/dicomweb", headers={"Authorization": f"Bearer {self.token()}"}
        )


def _serve(tmp: Path, signing_keys: Path, fill: dict[str, list[Path]]) -> Iterator[Served]:
    store = FileStore(tmp / "store")
    files = {name: [put(store, path) for path in paths] for name, paths in fill.items()}
    settings = Settings(
        storage_dir=store.root,
        index_url=f"sqlite:///{tmp / 'index.db'}",
        jwks_file=signing_keys,
        scan_interval_s=3600,  # the tests see only the top-up each request makes
    )
    with served(create_app(settings), 0) as port:
        yield Served(
            f"http://127.0.0.1:{port}", store, files, TokenService(load_key_set(signing_keys))
        )


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory: pytest.TempPathFactory, signing_keys: Path) -> Iterator[Served]:
    """One read-only store and server for the module (no test writes to either)."""
    tmp = tmp_path_factory.mktemp("console")
    sample = build_mr_study(tmp / "sample", n_slices=4)
    test_file = lambda name: Path(get_testdata_file(name))  # noqa: E731
    fill = {
        "sample": sample,
        "native": [relabelled(test_file("MR_small.dcm"), tmp / "n.dcm", PatientID="SW-T-NATIVE",
                              PatientName="Native^Test", StudyDate="20240301")],
        "rle": [relabelled(test_file("MR_small_RLE.dcm"), tmp / "r.dcm", PatientID="SW-T-RLE",
                           StudyDate="20240315")],
        "jp2k": [relabelled(test_file("MR_small_jp2klossless.dcm"), tmp / "j.dcm",
                            PatientID="SW-T-J2K", StudyDate="20230101")],
        "jpegls": [relabelled(test_file("MR_small_jpeg_ls_lossless.dcm"), tmp / "l.dcm",
                              PatientID="SW-T-JLS", StudyDate="20220101")],
        # Labelled High-Throughput JPEG 2000, which nothing installed here decodes.
        "htj2k": [relabelled(test_file("MR_small_jp2klossless.dcm"), tmp / "h.dcm",
                             PatientID="SW-T-HTJ2K", StudyDate="20210101",
                             transfer_syntax="1.2.840.10008.1.2.4.201")],
        "multiframe": [relabelled(test_file("emri_small.dcm"), tmp / "m.dcm",
                                  PatientID="SW-T-MULTI", AccessionNumber="ACC-77",
                                  StudyDate="20251201")],
    }  # fmt: skip
    yield from _serve(tmp, signing_keys, fill)


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _value(result: dict, tag: str) -> object:
    return result[tag]["Value"][0] if "Value" in result.get(tag, {}) else None


def test_search_for_studies_with_filters(dicomweb: Served) -> None:
    client = dicomweb.client()
    everything = client.search_for_studies()
    assert len(everything) == 7
    sample_study = _uids(dicomweb.files["sample"][0])[0]

    (found,) = client.search_for_studies(search_filters={"PatientID": "SW-DEMO-0001"})
    assert _value(found, "0020000D") == sample_study
    assert _value(found, "00201208") == 4  # NumberOfStudyRelatedInstances
    assert found["00080061"]["Value"] == ["MR"]  # ModalitiesInStudy
    assert found["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{sample_study}")
    assert "00100030" not in found  # PatientBirthDate only on request

    in_march = client.search_for_studies(search_filters={"StudyDate": "20240301-20240331"})
    assert sorted(_value(r, "00100020") for r in in_march) == ["SW-T-NATIVE", "SW-T-RLE"]
    before = client.search_for_studies(search_filters={"StudyDate": "-20231231"})
    assert [_value(r, "00100020") for r in before] == ["SW-T-J2K", "SW-T-JLS", "SW-T-HTJ2K"]
    (named,) = client.search_for_studies(search_filters={"PatientName": "nat*"})
    assert _value(named, "00100010") == {"Alphabetic": "Native^Test"}
    (accession,) = client.search_for_studies(search_filters={"AccessionNumber": "ACC-77"})
    assert _value(accession, "00100020") == "SW-T-MULTI"
    assert len(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == 7
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}) == []
    # A study-level key at the series and instance levels (the subquery once lost its FROM).
    assert len(client.search_for_series(search_filters={"ModalitiesInStudy": "MR"})) >= 7
    assert client.search_for_instances(search_filters={"ModalitiesInStudy": "CT"}) == []

    pages = [client.search_for_studies(limit=4, offset=o) for o in (0, 4)]
    uids = [_value(r, "0020000D") for page in pages for r in page]
    assert [len(p) for p in pages] == [4, 3] and len(set(uids)) == 7

    (with_birth,) = client.search_for_studies(
        search_filters={"PatientID": "SW-T-NATIVE"}, fields=["PatientBirthDate"]
    )
    assert "00100030" in with_birth


def test_search_for_series_and_instances(dicomweb: Served) -> None:
    client = dicomweb.client()
    study, series, _sop = _uids(dicomweb.files["sample"][0])
    (found,) = client.search_for_series(study)
    assert _value(found, "0020000E") == series and _value(found, "00201209") == 4
    assert len(client.search_for_series(search_filters={"Modality": "MR"})) == 7
    assert client.search_for_series(search_filters={"Modality": "CT"}) == []

    found = client.search_for_instances(study, series)
    numbers = [_value(r, "00200013") for r in found]
    assert numbers == sorted(numbers) and len(numbers) == 4
    wanted = _uids(dicomweb.files["sample"][2])[2]
    (one,) = client.search_for_instances(search_filters={"SOPInstanceUID": wanted})
    rows = pydicom.dcmread(dicomweb.files["sample"][2], stop_before_pixels=True).Rows
    assert _value(one, "00080018") == wanted and _value(one, "00280010") == rows
    assert _value(one, "0020000D") == study


def test_retrieve_instances_series_and_study(dicomweb: Served) -> None:
    client = dicomweb.client()
    path = dicomweb.files["sample"][1]
    study, series, sop = _uids(path)
    stored = pydicom.dcmread(path)
    got = client.retrieve_instance(study, series, sop)
    assert got.SOPInstanceUID == sop and got.PixelData == stored.PixelData

    expected = {_uids(p)[2] for p in dicomweb.files["sample"]}
    assert {ds.SOPInstanceUID for ds in client.retrieve_series(study, series)} == expected
    assert {ds.SOPInstanceUID for ds in client.retrieve_study(study)} == expected

    # A compressed instance comes as stored by default.
    rle = dicomweb.files["rle"][0]
    got = client.retrieve_instance(*_uids(rle))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert got.PixelData == pydicom.dcmread(rle).PixelData
    # Asked for Explicit VR Little Endian, it is decoded on the way.
    explicit = client.retrieve_instance(
        *_uids(rle), media_types=(("application/dicom", "1.2.840.10008.1.2.1"),)
    )
    assert explicit.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(explicit.pixel_array, pydicom.dcmread(rle).pixel_array)
    # An instance whose pixels nothing here decodes: 406 before any byte of the body.
    with pytest.raises(requests.HTTPError) as refused:
        client.retrieve_instance(
            *_uids(dicomweb.files["htj2k"][0]),
            media_types=(("application/dicom", "1.2.840.10008.1.2.1"),),
        )
    assert refused.value.response.status_code == 406
    not_dicom = httpx.get(
        f"{client.base_url}/studies/{study}",
        headers={"Authorization": f"Bearer {dicomweb.token()}", "Accept": "application/json"},
    )
    assert not_dicom.status_code == 406


def test_retrieve_metadata_leaves_pixels_out(dicomweb: Served) -> None:
    client = dicomweb.client()
    path = dicomweb.files["native"][0]
    meta = client.retrieve_instance_metadata(*_uids(path))
    assert _value(meta, "00100020") == "SW-T-NATIVE"
    assert _value(meta, "00280010") == 64  # Rows
    assert "7FE00010" not in meta
    assert _value(meta, "00083002") == "1.2.840.10008.1.2.1"
    series_meta = client.retrieve_series_metadata(*_uids(dicomweb.files["sample"][0])[:2])
    assert len(series_meta) == 4


def test_retrieve_frames(dicomweb: Served) -> None:
    client = dicomweb.client()
    multi = dicomweb.files["multiframe"][0]
    frames = client.retrieve_instance_frames(*_uids(multi), frame_numbers=[2, 5])
    array = pydicom.dcmread(multi).pixel_array
    assert frames == [array[1].tobytes(), array[4].tobytes()]

    rle = dicomweb.files["rle"][0]  # decoded by pydicom
    (frame,) = client.retrieve_instance_frames(*_uids(rle), frame_numbers=[1])
    assert frame == pydicom.dcmread(rle).pixel_array.tobytes()

    jp2k = dicomweb.files["jp2k"][0]  # lossless JPEG 2000, decoded through Pillow
    (frame,) = client.retrieve_instance_frames(*_uids(jp2k), frame_numbers=[1])
    assert frame == pydicom.dcmread(rle).pixel_array.tobytes()  # the same MR slice

    jpegls = dicomweb.files["jpegls"][0]  # lossless JPEG-LS, decoded through pyjpegls
    (frame,) = client.retrieve_instance_frames(*_uids(jpegls), frame_numbers=[1])
    assert frame == pydicom.dcmread(rle).pixel_array.tobytes()

    htj2k = dicomweb.files["htj2k"][0]  # no decoder here: said clearly
    with pytest.raises(requests.HTTPError) as refused:
        client.retrieve_instance_frames(*_uids(htj2k), frame_numbers=[1])
    assert refused.value.response.status_code == 406
    assert "High-Throughput JPEG 2000" in refused.value.response.json()["error"]

    with pytest.raises(requests.HTTPError) as missing:
        client.retrieve_instance_frames(*_uids(multi), frame_numbers=[11])
    assert missing.value.response.status_code == 404


def test_retrieve_rendered(dicomweb: Served) -> None:
    client = dicomweb.client()
    path = dicomweb.files["sample"][0]
    stored = pydicom.dcmread(path)
    png = client.retrieve_instance_rendered(*_uids(path), media_types=("image/png",))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "L"
    assert image.size == (stored.Columns, stored.Rows)

    narrow = client.retrieve_instance_rendered(
        *_uids(path), media_types=("image/png",), params={"window": "100,10"}
    )
    wide = client.retrieve_instance_rendered(
        *_uids(path), media_types=("image/png",), params={"window": "100,4000,linear-exact"}
    )
    narrow_px, wide_px = (np.asarray(Image.open(io.BytesIO(b))) for b in (narrow, wide))
    assert narrow_px.std() > wide_px.std()  # a narrow window stretches the contrast

    multi = dicomweb.files["multiframe"][0]
    jpeg = client.retrieve_instance_frames_rendered(*_uids(multi), frame_numbers=[3])
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"

    bad = httpx.get(
        f"{client.base_url}/studies/{'/series/'.join(_uids(path)[:2])}/instances/"
        f"{_uids(path)[2]}/rendered",
        params={"window": "100,wide"},
        headers={"Authorization": f"Bearer {dicomweb.token()}"},
    )
    assert bad.status_code == 400 and "number" in bad.json()["error"]


def test_tokens(dicomweb: Served) -> None:
    url = f"{dicomweb.url}/dicomweb/studies"
    none = httpx.get(url)
    assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Bearer")
    patient = dicomweb.token(Scope("patient", "*", "read"), patient="SW-DEMO-0001")
    refused = httpx.get(url, headers={"Authorization": f"Bearer {patient}"})
    assert refused.status_code == 403 and "patient" in refused.json()["error"]
    other = dicomweb.token(Scope("system", "Observation", "read"))
    assert httpx.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 403
    for scopes in (SYSTEM_READ, (Scope("user", "ImagingStudy", "read"),)):
        token = dicomweb.token(*scopes)
        assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    forged = TokenService(load_key_set(Path(dicomweb.store.root.parent / "other-keys.json")))
    bad = forged.issue("x", SYSTEM_READ)[0]
    assert httpx.get(url, headers={"Authorization": f"Bearer {bad}"}).status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/%2E%2E/series",
        "/dicomweb/studies/..%2F..%2Fetc/metadata",
        "/dicomweb/studies/1.2..3/metadata",
        "/dicomweb/studies/1.2.3/series/1.2.x/instances",
        "/dicomweb/studies/" + "1." * 32 + "1",  # 65 characters
    ],
)
def test_bad_uids_are_refused(dicomweb: Served, path: str) -> None:
    answer = httpx.get(dicomweb.url + path, headers={"Authorization": f"Bearer {dicomweb.token()}"})
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json" and answer.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/dicomweb/studies"), ("DELETE", "/dicomweb/studies/1.2.3"),
     ("PUT", "/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5")],
)  # fmt: skip
def test_writes_are_refused(dicomweb: Served, method: str, path: str) -> None:
    before = sorted(p for p in dicomweb.store.root.rglob("*"))
    answer = httpx.request(
        method, dicomweb.url + path, headers={"Authorization": f"Bearer {dicomweb.token()}"},
        content=b"--x--",
    )  # fmt: skip
    assert answer.status_code == 405 and "read only" in answer.json()["error"]
    assert sorted(p for p in dicomweb.store.root.rglob("*")) == before


def test_health_and_metrics(dicomweb: Served) -> None:
    assert httpx.get(f"{dicomweb.url}/healthz").json()["status"] == "ok"
    # A search by an identifier of its own (the test did rely on the module's earlier tests
    # for one): counted by route, the identifier in no label.
    assert dicomweb.client().search_for_studies(search_filters={"PatientID": "SW-DEMO-0001"})
    text = httpx.get(f"{dicomweb.url}/metrics").text
    assert "console_index_instances 10.0" in text
    assert 'route="/dicomweb/studies"' in text and "SW-" not in text


def test_a_freshly_stored_instance_appears(tmp_path: Path, signing_keys: Path) -> None:
    mr = Path(get_testdata_file("MR_small.dcm"))
    first = relabelled(mr, tmp_path / "first.dcm", PatientID="SW-T-FRESH")
    for server in _serve(tmp_path, signing_keys, {"first": [first]}):
        client = server.client()
        study = _uids(first)[0]
        assert len(client.search_for_instances(study)) == 1
        # Stored by the listener's FileStore while the console runs, then asked for at once:
        # no wait, the search itself tops the index up.
        later = relabelled(mr, tmp_path / "later.dcm", StudyInstanceUID=study,
                           SeriesInstanceUID=_uids(first)[1])  # fmt: skip
        put(server.store, later)
        found = client.search_for_instances(study)
        assert sorted(_value(r, "00080018") for r in found) == sorted(
            [_uids(first)[2], _uids(later)[2]]
        )
        assert client.retrieve_instance(*_uids(later)).SOPInstanceUID == _uids(later)[2]
        # Retrieved before any search: the retrieval tops the index up itself.
        third = relabelled(mr, tmp_path / "third.dcm", StudyInstanceUID=study,
                           SeriesInstanceUID=_uids(first)[1])  # fmt: skip
        put(server.store, third)
        png = client.retrieve_instance_rendered(*_uids(third), media_types=("image/png",))
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert len(client.retrieve_series(study, _uids(first)[1])) == 3
