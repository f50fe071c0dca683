"""Who may associate: called-AE check, calling-AE allow-list (optionally bound to a source
address) and the DICOM TLS context (PS3.15 Annex B.1).

Rejections are explicit A-ASSOCIATE-RJ PDUs with the PS3.8 9.3.4 reason (so the sender's log
says "calling AE title not recognised", not a network fault), and each is logged and counted.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from dicom_listener.dicom.contract import Peer
from dicom_listener.dicom.pdu import CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED
from dicom_listener.metrics import ListenerMetrics


@dataclass(frozen=True)
class _Allowed:
    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None


class AssociationPolicy:
    """Decides on each A-ASSOCIATE-RQ before its presentation contexts are negotiated."""

    def __init__(self, ae_title: str, allowed_calling_aes: list[str], metrics: ListenerMetrics):
        self.ae_title = ae_title.strip()
        self.metrics = metrics
        self.allowed = [self._parse(entry) for entry in allowed_calling_aes]

    @staticmethod
    def _parse(entry: str) -> _Allowed:
        title, _, address = entry.partition("@")
        network = ipaddress.ip_network(address, strict=False) if address else None
        return _Allowed(title.strip(), network)

    def check(self, peer: Peer) -> tuple[int, str] | None:
        """``(diagnostic, reason)`` when the association must be rejected, else None."""
        called_ae, calling_ae, address = peer.called_ae_title, peer.calling_ae_title, peer.address
        if called_ae.strip() != self.ae_title:
            return CALLED_AE_NOT_RECOGNIZED, "called_ae_not_recognized"
        if not self.allowed:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        for allowed in self.allowed:
            if allowed.ae_title != calling_ae.strip():
                continue
            if allowed.network is None or (ip is not None and ip in allowed.network):
                return None
        known_title = any(a.ae_title == calling_ae.strip() for a in self.allowed)
        return CALLING_AE_NOT_RECOGNIZED, (
            "calling_ae_wrong_address" if known_title else "calling_ae_not_allowed"
        )

    def count_reject(self, reason: str) -> None:
        """Count an association rejected for ``reason`` (the server logs it)."""
        self.metrics.associations_rejected.labels(reason).inc()


def server_ssl_context(cert_file: Path, key_file: Path, ca_file: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``ca_file`` the sender must present a certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
