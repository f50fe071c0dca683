"""Who may associate: called-AE check, calling-AE allow-list (optionally bound to a source
address) and the DICOM TLS context (PS3.15 Annex B.1).

Rejections are explicit A-ASSOCIATE-RJ PDUs with the PS3.8 9.3.4 reason (so the sender's log
says "calling AE title not recognised", not a network fault), and each is logged and counted.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.events import Event

from dicom_listener.metrics import ListenerMetrics

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4).
#: Result: rejected-permanent.
REJECTED_PERMANENT = 0x01
#: Source: DICOM UL service-user.
SOURCE_SERVICE_USER = 0x01
#: Diagnostic (service-user): calling-AE-title-not-recognized.
CALLING_AE_NOT_RECOGNIZED = 0x03
#: Diagnostic (service-user): called-AE-title-not-recognized.
CALLED_AE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True)
class _Allowed:
    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None


class AssociationPolicy:
    """Decides on each A-ASSOCIATE-RQ before pynetdicom negotiates it (``EVT_REQUESTED``)."""

    def __init__(self, ae_title: str, allowed_calling_aes: list[str], metrics: ListenerMetrics):
        self.ae_title = ae_title.strip()
        self.metrics = metrics
        self.allowed = [self._parse(entry) for entry in allowed_calling_aes]

    @staticmethod
    def _parse(entry: str) -> _Allowed:
        title, _, address = entry.partition("@")
        network = ipaddress.ip_network(address, strict=False) if address else None
        return _Allowed(title.strip(), network)

    def check(self, called_ae: str, calling_ae: str, address: str) -> tuple[int, str] | None:
        """``(diagnostic, reason)`` when the association must be rejected, else None."""
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

    def handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED: reject with the reason, or let pynetdicom negotiate."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        called = _text(primitive.called_ae_title)
        calling = _text(primitive.calling_ae_title)
        address = str(assoc.requestor.address)
        verdict = self.check(called, calling, address)
        if verdict is None:
            return
        diagnostic, reason = verdict
        self.metrics.associations_rejected.labels(reason).inc()
        log.warning(
            "association rejected: %s",
            reason,
            extra={
                "reason": reason,
                "calling_ae_title": calling,
                "called_ae_title": called,
                "peer_address": address,
            },
        )
        assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
        # As pynetdicom does after its own rejects: wait until the DUL has sent the PDU and
        # returned to idle, or the socket is closed before the sender reads the reason.
        assoc.kill()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return "" if value is None else str(value).strip()


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
