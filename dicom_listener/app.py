"""Composition root: builds the AE, the store, the outbox, its relay and the HTTP server.

Nothing here connects at import or in :func:`create_app`; :meth:`ListenerApp.start` opens the
outbox, binds the ports and starts the publisher thread, which reaches Kafka when it can.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time

from prometheus_client import CollectorRegistry
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_listener.adapters.filestore import FileStore, Quarantine
from dicom_listener.adapters.outbox import Outbox
from dicom_listener.adapters.publisher import EventSink, KafkaSink, OutboxRelay
from dicom_listener.config import Settings
from dicom_listener.handlers import Admission, StoreContext, handle_echo, handle_store
from dicom_listener.health import HealthCheck, HttpServer, http_app
from dicom_listener.metrics import ListenerMetrics
from dicom_listener.security import AssociationPolicy, server_ssl_context
from dicom_listener.sop_classes import TRANSFER_SYNTAXES, resolve_storage_classes

log = logging.getLogger(__name__)


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, made with :meth:`AE.make_server` and run by the app.

    With ``reuse_port`` it binds with ``SO_REUSEPORT``: several listener processes share the
    port and the kernel spreads new associations over them. It is not registered in the AE's
    own server list, so its shutdown only stops and closes it.
    """

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class SharedPortServer(ListenerServer):
    reuse_port = True


def build_ae(settings: Settings) -> AE:
    """The Application Entity with its presentation contexts and limits.

    SOP classes not in ``settings.sop_classes`` have no presentation context, so pynetdicom
    refuses them at negotiation (abstract syntax not supported), never after receiving data.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True  # reject associations addressed to another AE title
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.maximum_associations = settings.max_associations
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in resolve_storage_classes(settings.sop_classes):
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class ListenerApp:
    """The running listener: DICOM server, outbox relay and HTTP server (metrics, health)."""

    def __init__(
        self,
        settings: Settings,
        ae: AE,
        context: StoreContext,
        relay: OutboxRelay,
        policy: AssociationPolicy,
        store: FileStore | None,
        *,
        primary: bool = True,
        run_relay: bool = True,
    ) -> None:
        self.settings = settings
        self.ae = ae
        self.context = context
        self.relay = relay
        self.policy = policy
        self._file_store = store
        #: The primary process sweeps temporaries, runs the relay and the HTTP server; other
        #: worker processes only serve associations.
        self.primary = primary
        #: False when the relay runs in a publisher process of its own (see __main__).
        self.run_relay = primary and run_relay
        self.health = HealthCheck(settings.storage_dir, context.admission, context.outbox, relay)
        self._server: ThreadedAssociationServer | None = None
        self._server_thread: threading.Thread | None = None
        self._http: HttpServer | None = None

    @property
    def metrics(self) -> ListenerMetrics:
        return self.context.metrics

    @property
    def port(self) -> int:
        """The bound DICOM port (differs from the setting when that is 0)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def _handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self.policy.handle_requested),
            (evt.EVT_C_STORE, handle_store, [self.context]),
            (evt.EVT_C_ECHO, handle_echo),
        ]

    def start(self) -> None:
        """Open the outbox, start the relay, bind the DICOM and HTTP ports."""
        s = self.settings
        # Received datasets go to a temporary file as they arrive instead of into memory, so
        # a 500 MB multi-frame costs a chunk of memory, not 500 MB (pynetdicom's documented
        # switch; process-wide, which is what a listener process wants).
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.context.outbox.open()
        if self.primary:
            if self._file_store is not None:
                swept = self._file_store.sweep_temporaries()
                if swept:
                    log.info("removed unacknowledged temporary files", extra={"count": swept})
        if self.run_relay:
            self.relay.start()
        ssl_context = (
            server_ssl_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file)
            if s.tls_cert_file is not None and s.tls_key_file is not None
            else None
        )
        server = self.ae.make_server(
            (s.host, s.port),
            evt_handlers=self._handlers(),
            ssl_context=ssl_context,
            server_class=SharedPortServer if s.workers > 1 else ListenerServer,
        )
        self._server = server
        self._server_thread = threading.Thread(
            target=server.serve_forever, name="dicom-server", daemon=True
        )
        self._server_thread.start()
        if s.metrics_port and self.primary:
            self._http = HttpServer(
                s.host, s.metrics_port, http_app(self.metrics.registry, self.health)
            )
            self._http.start()
        log.info(
            "listening",
            extra={
                "ae_title": s.ae_title,
                "host": s.host,
                "port": self.port,
                "tls": ssl_context is not None,
                "storage_dir": str(s.storage_dir),
                "outbox": str(s.resolved_outbox_path),
                "allowed_calling_aes": s.allowed_calling_aes or "any",
                "metrics_port": s.metrics_port or None,
                "primary": self.primary,
            },
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting associations, let running ones finish (up to ``grace_s``, then abort
        them: an aborted C-STORE was never answered with success), stop the relay."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self.ae.shutdown()
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self.run_relay:
            self.relay.stop()
        else:
            self.context.outbox.close()
        log.info("stopped")


def create_app(
    settings: Settings,
    *,
    sink: EventSink | None = None,
    registry: CollectorRegistry | None = None,
    primary: bool = True,
    run_relay: bool = True,
) -> ListenerApp:
    """Build the listener from ``settings``; tests pass a fake sink instead of Kafka."""
    metrics = ListenerMetrics(registry)
    outbox = Outbox(settings.resolved_outbox_path)
    store = FileStore(settings.storage_dir)
    context = StoreContext(
        store=store,
        outbox=outbox,
        metrics=metrics,
        quarantine=Quarantine(settings.resolved_quarantine_dir),
        admission=Admission(
            settings.storage_dir, settings.min_free_disk_bytes, outbox, settings.outbox_max_events
        ),
    )
    relay = OutboxRelay(
        outbox,
        sink or KafkaSink(settings.kafka_bootstrap_servers, settings.kafka_timeout_s),
        metrics,
        batch_size=settings.publish_batch_size,
        retry_max_s=settings.publish_retry_max_s,
        # Other processes commit events without waking this relay: poll often then.
        idle_poll_s=0.05 if settings.workers > 1 or not run_relay else 1.0,
        linger_s=settings.publish_linger_s,
    )
    outbox.on_commit(relay.wake)
    metrics.track_outbox_depth(outbox.depth)
    policy = AssociationPolicy(settings.ae_title, settings.allowed_calling_aes, metrics)
    return ListenerApp(
        settings,
        build_ae(settings),
        context,
        relay,
        policy,
        store,
        primary=primary,
        run_relay=run_relay,
    )
