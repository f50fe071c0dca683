"""No default secrets anywhere: no settings field that holds a secret has a value before the
operator gives it one, and docker-compose.yml takes every secret from the environment with no
fallback. (The development stack makes its own per run: tests/unit/test_stack_auth.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
#: A field holding a credential, by its name.
SECRET_NAME = re.compile(r"(secret|password|passwd|token|api_key|private_key|credential)s?$")


def _settings_classes() -> list[type[BaseSettings]]:
    from dicom_listener.config import Settings as Listener
    from inference_worker.config import Settings as Worker
    from services.auth.config import AuthSettings
    from services.console.config import Settings as Console
    from services.fhir_api.config import Settings as Fhir
    from services.model_server.config import Settings as ModelServer
    from services.portal.config import Settings as Portal

    return [Listener, Worker, AuthSettings, Console, Fhir, ModelServer, Portal]


@pytest.mark.parametrize("settings", _settings_classes(), ids=lambda s: s.__module__)
def test_no_settings_field_holds_a_secret_by_default(settings: type[BaseSettings]) -> None:
    secret_fields = {
        name: field for name, field in settings.model_fields.items() if SECRET_NAME.search(name)
    }
    for name, field in secret_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        assert default in (None, ""), f"{settings.__module__}.{name} has a default secret"
    # Every field that holds a secret is found by its name (the check above is not empty
    # where a service has one).
    expected = {
        "services.fhir_api.config": {"metrics_token"},
        "services.portal.config": {"client_secret", "metrics_token"},
        "services.console.config": {"client_secret", "metrics_token"},
        "inference_worker.config": {"fhir_client_secret", "metrics_token"},
        "dicom_listener.config": {"metrics_token"},
        "services.model_server.config": {"metrics_token"},
    }.get(settings.__module__)
    if expected is not None:
        assert expected <= set(secret_fields), set(secret_fields)


def test_compose_takes_every_secret_from_the_environment_without_a_fallback() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    secret_vars = {
        match.group(1)
        for match in re.finditer(r"\$\{([A-Z0-9_]+)", compose)
        if re.search(r"SECRET|PASSWORD|TOKEN|KEY", match.group(1))
    }
    assert {"POSTGRES_PASSWORD", "WORKER_FHIR_SECRET", "METRICS_TOKEN"} <= secret_vars
    for name in secret_vars:
        defaults = re.findall(rf"\$\{{{name}:?-", compose)
        assert not defaults, f"{name} has a default value in docker-compose.yml"
        assert f"${{{name}:?" in compose, f"compose does not refuse to start without {name}"
