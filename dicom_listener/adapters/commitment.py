"""Storage Commitment results sent on a new association (PS3.4 J.3.3): when the sender left
before taking the N-EVENT-REPORT on its own association, the listener opens one to the
sender's address, proposing the Storage Commitment Push Model as SCP (role selection, PS3.7
D.3.3.4), and sends it there. pynetdicom is the association requester here: an outgoing
association per result is rare, and not on the C-STORE path that the listener's own upper
layer exists for."""

from __future__ import annotations

import logging
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicom_listener.metrics import ListenerMetrics

log = logging.getLogger(__name__)

#: Tries per result, the first at once, then after 1, 2, 4 ... seconds.
ATTEMPTS = 5


class CommitmentReporter:
    """Delivers Storage Commitment results on new associations, each on a thread of its own."""

    def __init__(
        self,
        ae_title: str,
        peers: dict[str, tuple[str, int]],
        metrics: ListenerMetrics,
        first_retry_s: float = 1.0,
    ) -> None:
        self.ae_title = ae_title
        #: Sender AE title → (host, port) of its Storage Commitment SCU's listening side.
        self.peers = peers
        self.metrics = metrics
        self.first_retry_s = first_retry_s

    def deliver(self, peer_ae: str, event_type: int, result: Dataset) -> None:
        """Send ``result`` to ``peer_ae`` on a new association, in the background."""
        address = self.peers.get(peer_ae)
        if address is None:
            self.metrics.commitment_reports.labels("undeliverable").inc()
            log.warning(
                "storage commitment result not delivered: the sender left before taking it, "
                "and no address is configured for it (SCANWATCH_LISTENER_COMMITMENT_PEERS)",
                extra={"calling_ae_title": peer_ae},
            )
            return
        threading.Thread(
            target=self._send,
            args=(peer_ae, address, event_type, result),
            name="commitment-report",
            daemon=True,
        ).start()

    def _send(
        self, peer_ae: str, address: tuple[str, int], event_type: int, result: Dataset
    ) -> None:
        delay = self.first_retry_s
        for attempt in range(1, ATTEMPTS + 1):
            if self._try(peer_ae, address, event_type, result):
                self.metrics.commitment_reports.labels("new_association").inc()
                log.info("storage commitment result delivered", extra={"calling_ae_title": peer_ae})
                return
            if attempt < ATTEMPTS:
                time.sleep(delay)  # a daemon thread: the listener's exit ends it
            delay *= 2
        self.metrics.commitment_reports.labels("undeliverable").inc()
        log.warning("storage commitment result not delivered", extra={"calling_ae_title": peer_ae})

    def _try(
        self, peer_ae: str, address: tuple[str, int], event_type: int, result: Dataset
    ) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(
            StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        try:
            assoc = ae.associate(*address, ae_title=peer_ae, ext_neg=[role])
            if not assoc.is_established:
                return False
            try:
                status, _ = assoc.send_n_event_report(
                    result, event_type, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
                )
            finally:
                assoc.release()
            return bool(status) and status.Status == 0x0000
        except Exception as exc:  # noqa: BLE001 - a peer down or odd: try again later
            log.info("storage commitment delivery failed: %r", exc)
            return False
        finally:
            ae.shutdown()
