"""HTTPS straight from the service: ``scanwatch-fhir-api serve`` with
``SCANWATCH_FHIR_TLS_CERT_FILE`` / ``_TLS_KEY_FILE`` (a certificate signed by a CA made here),
reached by a client that verifies it against that CA and nothing else. The portal and the
console pass the same two settings to uvicorn (``scanwatch.http_access.uvicorn_tls``)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from devtools.kafka_local import free_port
from devtools.testing import wait_for
from scanwatch.http_access import uvicorn_tls
from services.fhir_api.config import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost: (CA certificate,
    server certificate, server key), PEM files as openssl would write them."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("scanwatch test CA"))
        .issuer_name(_name("scanwatch test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("fhir-api"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


@pytest.fixture
def https_api(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The FHIR API served over HTTPS by its own entry point: (base URL, CA file)."""
    ca_file, cert_file, key_file = make_ca_and_server(tmp_path)
    port = free_port()
    env = os.environ | {
        "SCANWATCH_FHIR_HOST": "127.0.0.1",
        "SCANWATCH_FHIR_PORT": str(port),
        "SCANWATCH_FHIR_DATABASE_URL": f"sqlite:///{tmp_path / 'fhir.db'}",
        "SCANWATCH_FHIR_SIGNING_KEYS_FILE": str(tmp_path / "signing-keys.json"),
        "SCANWATCH_FHIR_TLS_CERT_FILE": str(cert_file),
        "SCANWATCH_FHIR_TLS_KEY_FILE": str(key_file),
        "SCANWATCH_FHIR_LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "fhir-api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.fhir_api", "serve"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"https://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "fhir-api.log").read_text()
        try:
            return httpx.get(f"{base}/healthz", verify=str(ca_file), timeout=2).is_success
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 120, "the FHIR API answering over HTTPS")
        yield base, ca_file
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_the_fhir_api_serves_https_that_verifies_against_its_ca(
    https_api: tuple[str, Path],
) -> None:
    base, ca_file = https_api
    trusted = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(verify=trusted, timeout=10) as client:
        metadata = client.get(f"{base}/fhir/metadata")
        assert metadata.status_code == 200
        assert metadata.json()["resourceType"] == "CapabilityStatement"
        # TLS changes nothing about who may read: still a token per request.
        assert client.get(f"{base}/fhir/Observation").status_code == 401
    # A client that does not trust that CA refuses the connection (the certificate is checked).
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{base}/healthz", verify=ssl.create_default_context(), timeout=10)
    # Plain HTTP on the HTTPS port gets no answer from the API.
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/healthz", timeout=10).raise_for_status()


def test_tls_settings_come_in_pairs_of_existing_files(tmp_path: Path) -> None:
    _ca, cert_file, key_file = make_ca_and_server(tmp_path)
    with pytest.raises(ValidationError, match="SCANWATCH_FHIR_TLS_CERT_FILE and"):
        Settings(tls_cert_file=cert_file)
    with pytest.raises(ValidationError, match="SCANWATCH_FHIR_TLS_KEY_FILE"):
        Settings(tls_cert_file=cert_file, tls_key_file=tmp_path / "missing.key")
    settings = Settings(tls_cert_file=cert_file, tls_key_file=key_file)
    assert uvicorn_tls(settings.tls_cert_file, settings.tls_key_file) == {
        "ssl_certfile": str(cert_file),
        "ssl_keyfile": str(key_file),
    }
    assert uvicorn_tls(None, None) == {}
