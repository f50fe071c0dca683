"""The console as ``scanwatch run`` starts it (devtools/stack.py): beside the FHIR API, over
the listener's store folder, verifying tokens against the API's published keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.cli import dev_tokens
from devtools.stack import Stack
from dicom_listener.adapters.filestore import FileStore
from scanwatch.sample import build_mr_study
from services.auth.scopes import parse_scopes
from services.console.tests.helpers import console_stack, put

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with console_stack(tmp_path_factory.mktemp("console-stack")) as running:
        yield running


def test_the_stacks_console_serves_the_listeners_store(stack: Stack, tmp_path: Path) -> None:
    sample = build_mr_study(tmp_path / "sample", n_slices=2)
    store = FileStore(stack.config.var / "store")
    for path in sample:
        put(store, path)
    url = f"http://127.0.0.1:{stack.config.ports.console}/dicomweb/studies"
    tokens = dev_tokens(stack.config.var)
    system = tokens.issue("test", parse_scopes("system/*.read"))[0]
    found = httpx.get(url, headers={"Authorization": f"Bearer {system}"}, timeout=30)
    assert found.status_code == 200, found.text
    assert len(found.json()) == 1
    patient = tokens.issue("test", parse_scopes("patient/*.read"), "p-1")[0]
    refused = httpx.get(url, headers={"Authorization": f"Bearer {patient}"}, timeout=30)
    assert refused.status_code == 403
    assert "DICOMweb" in stack.banner()
