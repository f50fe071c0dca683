"""Composition root: builds the AE, the store, the publisher and the metrics from Settings.

Nothing here connects at import or in :func:`create_app`; :meth:`ListenerApp.start` binds the
ports and Kafka is reached on the first C-STORE.
"""

from __future__ import annotations

import logging
import threading
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_listener.adapters.filestore import FileStore, InstanceStore
from dicom_listener.adapters.publisher import EventPublisher, KafkaEventPublisher
from dicom_listener.config import Settings
from dicom_listener.handlers import StoreContext, handle_echo, handle_store
from dicom_listener.metrics import ListenerMetrics

log = logging.getLogger(__name__)

#: Storage SOP Classes this SCP accepts (MR only; the pipeline scores MR).
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    MRImageStorage,
    EnhancedMRImageStorage,
    EnhancedMRColorImageStorage,
)
#: Transfer syntaxes accepted for every storage class: stored as received, never transcoded.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def build_ae(settings: Settings) -> AE:
    """The Application Entity with its presentation contexts and limits."""
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True  # reject associations addressed to another AE title
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class ListenerApp:
    """The running listener: DICOM server, metrics server and the publisher they share."""

    def __init__(
        self,
        settings: Settings,
        ae: AE,
        context: StoreContext,
    ) -> None:
        self.settings = settings
        self.ae = ae
        self.context = context
        self._server: ThreadedAssociationServer | None = None
        self._metrics_server: tuple[WSGIServer, threading.Thread] | None = None

    @property
    def metrics(self) -> ListenerMetrics:
        return self.context.metrics

    @property
    def port(self) -> int:
        """The bound DICOM port (differs from the setting when that is 0)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def _handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_STORE, handle_store, [self.context]),
            (evt.EVT_C_ECHO, handle_echo),
        ]

    def start(self) -> None:
        """Bind the DICOM port (and the metrics port unless it is 0) and serve in threads."""
        s = self.settings
        self._server = self.ae.start_server(
            (s.host, s.port), block=False, evt_handlers=self._handlers()
        )
        if s.metrics_port:
            self._metrics_server = start_http_server(
                s.metrics_port, addr=s.host, registry=self.metrics.registry
            )
        log.info(
            "listening",
            extra={
                "ae_title": s.ae_title,
                "host": s.host,
                "port": self.port,
                "storage_dir": str(s.storage_dir),
                "metrics_port": s.metrics_port or None,
            },
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting associations, let running ones finish (up to ``grace_s``, then abort
        them: an aborted C-STORE was never answered with success), close the publisher."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self.ae.shutdown()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._metrics_server = None
        self.context.publisher.close()
        log.info("stopped")


def create_app(
    settings: Settings,
    *,
    publisher: EventPublisher | None = None,
    store: InstanceStore | None = None,
    registry: CollectorRegistry | None = None,
) -> ListenerApp:
    """Build the listener from ``settings``; tests pass fakes for the publisher or the store."""
    context = StoreContext(
        store=store or FileStore(settings.storage_dir),
        publisher=publisher
        or KafkaEventPublisher(settings.kafka_bootstrap_servers, settings.kafka_timeout_s),
        metrics=ListenerMetrics(registry),
    )
    return ListenerApp(settings, build_ae(settings), context)
