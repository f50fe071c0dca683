"""The development stack runs the FHIR API with tokens required, chatbot or not: the worker
writes with a client made for this run, and the banner prints a development token that its
curl line uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devtools.stack import WORKER_CLIENT, Stack, StackConfig, dev_tokens


@pytest.mark.parametrize("chatbot", [False, True])
def test_the_fhir_api_requires_tokens_and_the_worker_has_a_client(
    tmp_path: Path, chatbot: bool
) -> None:
    stack = Stack(StackConfig(var=tmp_path, chatbot=chatbot))
    fhir = stack.service("fhir-api").env
    worker = stack.service("inference-worker").env
    assert fhir["SCANWATCH_FHIR_AUTH_MODE"] == "required"
    client_id, secret, scopes = fhir["SCANWATCH_FHIR_BOOTSTRAP_CLIENTS"].split(":", 2)
    assert client_id == WORKER_CLIENT and "system/*.write" in scopes.split()
    assert worker["SCANWATCH_WORKER_FHIR_CLIENT_ID"] == WORKER_CLIENT
    assert worker["SCANWATCH_WORKER_FHIR_CLIENT_SECRET"] == secret
    # Made for this run: another stack has another one.
    assert Stack(StackConfig(var=tmp_path, chatbot=chatbot)).worker_secret != secret


def test_the_banner_prints_a_development_token_and_its_curl_line_uses_it(
    tmp_path: Path,
) -> None:
    stack = Stack(StackConfig(var=tmp_path))  # --no-chatbot
    banner = stack.banner()
    assert "(bearer tokens required)" in banner
    [token] = re.findall(r"export SCANWATCH_TOKEN=(\S+)", banner)
    grant = dev_tokens(tmp_path).verify(token)  # what the stack's FHIR API checks
    assert [str(s) for s in grant.scopes] == ["system/*.read"]
    [curl] = [line for line in banner.splitlines() if line.strip().startswith("curl ")]
    assert '-H "Authorization: Bearer $SCANWATCH_TOKEN"' in curl
    assert f"{stack.config.fhir_base}/Observation" in curl
