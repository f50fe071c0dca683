"""Association security against dcmtk: calling-AE allow-list bound to addresses, explicit
rejects with reasons, DICOM TLS (storescu +tls) with and without client certificates."""

from __future__ import annotations

import logging
import subprocess
import uuid
from pathlib import Path

import pytest

from devtools.kafka_local import LocalKafka
from devtools.peers import PeerError, echoscu, storescu, tls_args
from dicom_listener.app import ListenerApp
from dicom_listener.dicom.contract import Peer
from dicom_listener.metrics import ListenerMetrics
from dicom_listener.security import AssociationPolicy
from dicom_listener.tests.test_listener_integration import AE_TITLE, start_listener
from scanwatch.sample import build_mr_study


def rejected(app: ListenerApp, reason: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "scanwatch_listener_associations_rejected_total", {"reason": reason}
    )
    return value or 0.0


def test_policy_checks_title_then_address() -> None:
    policy = AssociationPolicy(
        "SCANWATCH", ["CT1", "MR1@10.1.0.0/16", "MR1@::1"], ListenerMetrics()
    )
    assert policy.check(Peer("SCANWATCH", "CT1", "192.168.1.1")) is None
    assert policy.check(Peer("SCANWATCH", "MR1", "10.1.2.3")) is None
    assert policy.check(Peer("SCANWATCH", "MR1", "::1")) is None
    assert policy.check(Peer("SCANWATCH", "MR1", "10.2.0.1")) == (0x03, "calling_ae_wrong_address")
    assert policy.check(Peer("SCANWATCH", "US1", "10.1.2.3")) == (0x03, "calling_ae_not_allowed")
    assert policy.check(Peer("OTHER", "CT1", "10.1.2.3")) == (0x07, "called_ae_not_recognized")
    assert (
        AssociationPolicy("SCANWATCH", [], ListenerMetrics()).check(Peer("SCANWATCH", "X", "h"))
        is None
    )


@pytest.mark.integration
def test_allow_list_rejects_with_reason_and_logs(
    kafka: LocalKafka, tmp_path: Path, mr_series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        allowed_calling_aes="LOCALMR@127.0.0.0/8,REMOTEMR@10.9.9.9",
    )
    try:
        caplog.set_level(logging.WARNING, logger="dicom_listener")
        assert echoscu("127.0.0.1", app.port, AE_TITLE, calling_ae="LOCALMR")
        with pytest.raises(PeerError, match="(?i)calling AE title not recognized"):
            storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE, calling_ae="INTRUDER")
        with pytest.raises(PeerError, match="(?i)calling AE title not recognized"):
            storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE, calling_ae="REMOTEMR")
        storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE, calling_ae="LOCALMR")
        assert rejected(app, "calling_ae_not_allowed") == 1
        assert rejected(app, "calling_ae_wrong_address") == 1
        reasons = [
            getattr(r, "reason", None)
            for r in caplog.records
            if r.getMessage().startswith("association rejected")
        ]
        assert reasons == ["calling_ae_not_allowed", "calling_ae_wrong_address"]
    finally:
        app.stop()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=scanwatch test CA", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:modality")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                f"{name}.ext", cwd=d)  # fmt: skip
    return d


@pytest.mark.integration
def test_tls_with_client_certificates(kafka: LocalKafka, tmp_path: Path, pki: Path) -> None:
    files = build_mr_study(
        tmp_path / "sent", patient_id=f"SW-TLS-{uuid.uuid4().hex[:6]}", n_slices=2
    )
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
        tls_ca_file=pki / "ca.pem",
    )
    try:
        client = tls_args(pki / "client.key", pki / "client.pem", pki / "ca.pem")
        storescu(files, "127.0.0.1", app.port, AE_TITLE, extra_args=client)
        assert app.metrics.registry.get_sample_value(
            "scanwatch_listener_instances_received_total"
        ) == len(files)
        # Without a client certificate, or in clear text, nothing gets through.
        anonymous = tls_args(None, None, pki / "ca.pem")
        assert not echoscu("127.0.0.1", app.port, AE_TITLE, extra_args=anonymous)
        assert not echoscu("127.0.0.1", app.port, AE_TITLE)
    finally:
        app.stop()


@pytest.mark.integration
def test_tls_without_client_certificates_accepts_anonymous_clients(
    kafka: LocalKafka, tmp_path: Path, pki: Path, mr_series: list[Path]
) -> None:
    app = start_listener(
        tmp_path,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
    )
    try:
        anonymous = tls_args(None, None, pki / "ca.pem")
        storescu(mr_series[:1], "127.0.0.1", app.port, AE_TITLE, extra_args=anonymous)
        # A client that trusts another CA refuses our certificate.
        wrong_ca = tls_args(None, None, pki / "client.pem")
        assert not echoscu("127.0.0.1", app.port, AE_TITLE, extra_args=wrong_ca)
    finally:
        app.stop()
