"""``scanwatch patients invite`` and ``scanwatch clients register-app`` (devtools/cli.py) write
to the FHIR store the API reads: the printed link opens the activation page, the registered
app can start a sign-in."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from devtools import cli
from scanwatch import ids
from services.auth import accounts
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.smart_helpers import authorization


def test_the_cli_invites_patients_and_registers_apps(
    tmp_path: Path,
    signing_keys: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database_url = f"sqlite:///{tmp_path / 'fhir.db'}"
    monkeypatch.setattr(cli, "configure_logging", lambda *_args: None)
    monkeypatch.setenv("SCANWATCH_FHIR_DATABASE_URL", database_url)
    monkeypatch.delenv("SCANWATCH_AUTH_ISSUER", raising=False)
    argv = ["--var", str(tmp_path), "patients", "invite", "SW-CLI-1", "--expires-hours", "1"]
    assert cli.main(argv) == 0
    links = re.findall(
        r"http://127\.0\.0\.1:8080/auth/activate\?token=\S+", capsys.readouterr().out
    )
    assert len(links) == 1
    redirect = "http://127.0.0.1:8090/callback"
    argv = ["--var", str(tmp_path), "clients", "register-app", "cli-portal"]
    assert cli.main([*argv, "--redirect-uri", redirect, "--description", "CLI portal"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered == {"client_id": "cli-portal", "redirect_uris": [redirect]}
    assert cli.main([*argv, "--redirect-uri", "http://evil.example/cb"]) == 2  # https off loopback
    confidential = ["--redirect-uri", redirect, "--confidential", "--description", "CLI portal"]
    assert cli.main([*argv, *confidential]) == 0
    assert len(json.loads(capsys.readouterr().out)["client_secret"]) > 30
    settings = Settings(
        database_url=database_url, auth_mode="required", signing_keys_file=signing_keys
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        link = urlsplit(links[0])
        page = client.get(f"{link.path}?{link.query}")
        assert page.status_code == 200 and "Create your account" in page.text
        request = authorization(
            "http://127.0.0.1:8080/fhir", client_id="cli-portal", redirect_uri=redirect
        )
        sign_in = client.get("/auth/authorize", params=request.params)
        assert sign_in.status_code == 200 and "CLI portal" in sign_in.text


def test_an_unsafe_auth_setting_stops_the_api_before_it_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import services.fhir_api.__main__ as entry

    monkeypatch.setattr(entry, "configure_logging", lambda *_args: None)
    monkeypatch.setenv("SCANWATCH_FHIR_DATABASE_URL", f"sqlite:///{tmp_path / 'fhir.db'}")
    monkeypatch.setenv("SCANWATCH_AUTH_ISSUER", "http://auth.hospital.example")
    assert entry.main(["serve"]) == 2
    assert not (tmp_path / "fhir.db").exists()
    assert any("https off loopback" in str(getattr(r, "errors", "")) for r in caplog.records)


def test_send_sample_prints_an_invite_for_the_sample_patient(
    tmp_path: Path,
    signing_keys: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import devtools.peers
    import scanwatch.sample

    database_url = f"sqlite:///{tmp_path / 'fhir.db'}"
    monkeypatch.setattr(cli, "configure_logging", lambda *_args: None)
    monkeypatch.setenv("SCANWATCH_FHIR_DATABASE_URL", database_url)
    monkeypatch.delenv("SCANWATCH_AUTH_ISSUER", raising=False)
    monkeypatch.setattr(scanwatch.sample, "build_mr_study", lambda *_a, **_k: [])
    monkeypatch.setattr(devtools.peers, "storescu", lambda *_a, **_k: None)  # no listener here
    argv = ["--var", str(tmp_path), "send-sample", "--patient-id", "SW-DEMO-0001"]
    assert cli.main([*argv, "--no-care-plan"]) == 0
    (link,) = re.findall(
        r"http://127\.0\.0\.1:8080/auth/activate\?token=\S+", capsys.readouterr().out
    )
    settings = Settings(
        database_url=database_url, auth_mode="required", signing_keys_file=signing_keys
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        parts = urlsplit(link)
        assert client.get(f"{parts.path}?{parts.query}").status_code == 200
        token = parse_qs(parts.query)["token"][0]
        engine = client.app.state.store.engine  # type: ignore[attr-defined]
        invite = accounts.pending_invite(engine, token, datetime.now(UTC))
    assert invite.patient == ids.patient_id(None, "SW-DEMO-0001")  # the sample's Patient
