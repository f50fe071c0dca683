"""The console's pages as ``scanwatch run`` starts them (devtools/stack.py): registered as a
staff app of the FHIR API's authorization server, with a development clinician login that the
banner prints and that signs in (over plain HTTP here, as a browser would submit the forms)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from devtools.browser import form_fields
from devtools.stack import (
    DEV_OPERATOR_USERNAME,
    DEV_STAFF_USERNAME,
    Stack,
)
from scanwatch.model_registry import SERVING, Registry
from scanwatch.model_repository import DEFAULT_MODEL_NAME
from services.console.tests.helpers import console_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with console_stack(tmp_path_factory.mktemp("console-web-stack")) as running:
        yield running


def banner_login(stack: Stack) -> tuple[str, str]:
    console = f"http://127.0.0.1:{stack.config.ports.console}"
    line = rf"staff console: +{re.escape(console)}/ +\(development login: (\S+) / (\S+),"
    found = re.search(line, stack.banner())
    assert found is not None, stack.banner()
    username, password = found.groups()
    return username, password


def sign_in(browser: httpx.Client, console: str, username: str, password: str) -> None:
    start = browser.get(f"{console}/login")
    assert start.status_code == 303
    sign_in_page = browser.get(start.headers["location"])
    assert sign_in_page.status_code == 200, sign_in_page.text
    fields = form_fields(sign_in_page.text)
    fields.update(username=username, password=password, totp="", action="sign-in")
    auth = str(sign_in_page.url).split("/auth/")[0]
    back = browser.post(f"{auth}/auth/authorize", data=fields)
    assert back.status_code == 302, back.text
    assert back.headers["location"].startswith(f"{console}/callback?")
    landed = browser.get(back.headers["location"])
    assert landed.status_code == 303 and landed.headers["location"] == "/"


def test_the_banner_login_signs_in_to_the_console(stack: Stack) -> None:
    console = f"http://127.0.0.1:{stack.config.ports.console}"
    username, password = banner_login(stack)
    assert username == DEV_STAFF_USERNAME
    with httpx.Client(timeout=30) as browser:
        sign_in(browser, console, username, password)
        worklist = browser.get(f"{console}/worklist")
        assert worklist.status_code == 200 and "Signed in: clinician" in worklist.text


def test_the_banner_names_an_operator_who_reaches_the_operator_pages(stack: Stack) -> None:
    console = f"http://127.0.0.1:{stack.config.ports.console}"
    _, password = banner_login(stack)
    assert f"{DEV_OPERATOR_USERNAME}, same password, an operator" in stack.banner()
    # What the bootstrap's default model leaves in the repository the stack hands the console.
    Registry(stack.config.model_repository).register_existing(
        DEFAULT_MODEL_NAME,
        1,
        status=SERVING,
        dataset_fingerprint=None,
        metrics={"macro_f1": 0.978},
        class_names=["normal", "mass"],
        threshold=0.5,
    )
    with httpx.Client(timeout=30) as browser:
        sign_in(browser, console, DEV_OPERATOR_USERNAME, password)
        models = browser.get(f"{console}/operator/models")
        assert models.status_code == 200 and "Signed in: operator" in models.text
        # The stack points the console at its model repository: the default model is listed.
        assert f"Versions of {DEFAULT_MODEL_NAME}" in models.text and "0.9780" in models.text
