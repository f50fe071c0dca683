"""Composition root: builds the DICOM server, the store, the outbox, its relay and the HTTP
server.

Nothing here connects at import or in :func:`create_app`; :meth:`ListenerApp.start` opens the
outbox, binds the ports and starts the publisher thread, which reaches Kafka when it can.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from prometheus_client import CollectorRegistry
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_listener.adapters.commitment import CommitmentReporter
from dicom_listener.adapters.filestore import FileStore, Quarantine
from dicom_listener.adapters.outbox import Outbox, PlacementSettler
from dicom_listener.adapters.publisher import EventSink, FlushSignal, KafkaSink, OutboxRelay
from dicom_listener.config import Settings
from dicom_listener.dicom.association import ServerConfig
from dicom_listener.dicom.contract import NormalizedRequest, NormalizedResponse
from dicom_listener.dicom.server import StorageServer
from dicom_listener.dicom.uids import VERIFICATION
from dicom_listener.handlers import Admission, StoreContext, handle_store, record_unrecorded
from dicom_listener.health import HealthCheck, http_app
from dicom_listener.metrics import ListenerMetrics
from dicom_listener.procedure_steps import MPPS_SOP_CLASS, handle_procedure_step
from dicom_listener.security import AssociationPolicy, server_ssl_context
from dicom_listener.sop_classes import TRANSFER_SYNTAXES, resolve_storage_classes
from dicom_listener.storage_commitment import (
    STORAGE_COMMITMENT,
    CommitmentContext,
    handle_commitment,
)
from scanwatch.http_access import HttpServer, metrics_closed_warning

log = logging.getLogger(__name__)


def presentation_contexts(settings: Settings) -> dict[str, frozenset[str]]:
    """Abstract syntax → accepted transfer syntaxes: Verification and the storage classes.

    SOP classes not in ``settings.sop_classes`` have no entry, so they are refused at
    negotiation (abstract syntax not supported), never after their data was received.
    """
    little_endian = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
    contexts: dict[str, frozenset[str]] = {VERIFICATION: little_endian}
    if settings.mpps:
        contexts[MPPS_SOP_CLASS] = little_endian
    if settings.storage_commitment:
        contexts[STORAGE_COMMITMENT] = little_endian
    syntaxes = frozenset(str(ts) for ts in TRANSFER_SYNTAXES)
    for sop_class in resolve_storage_classes(settings.sop_classes):
        contexts[str(sop_class)] = syntaxes
    return contexts


class ListenerApp:
    """The running listener: DICOM server, outbox relay and HTTP server (metrics, health)."""

    def __init__(
        self,
        settings: Settings,
        context: StoreContext,
        relay: OutboxRelay,
        policy: AssociationPolicy,
        store: FileStore,
        commitment: CommitmentContext,
        *,
        primary: bool = True,
        run_relay: bool = True,
    ) -> None:
        self.settings = settings
        self.context = context
        self.commitment = commitment
        self.relay = relay
        self.policy = policy
        self.store = store
        #: The primary process sweeps temporaries, runs the relay and the HTTP server; other
        #: worker processes only serve associations.
        self.primary = primary
        #: False when the relay runs in a publisher process of its own (see __main__).
        self.run_relay = primary and run_relay
        #: Fsyncs the folders of placed files in batches (the primary's, for every process).
        self.settler = PlacementSettler(context.outbox)
        self.health = HealthCheck(settings.storage_dir, context.admission, context.outbox, relay)
        #: Association ends, from the processes that do not run the relay to the one that does.
        self.flush_signal = FlushSignal(settings.resolved_outbox_path)
        self._server: StorageServer | None = None
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
        return self._server.port

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def _association_ended(self) -> None:
        """On the association's own thread, as it ends: what its sender stored is published
        without lingering, and the thread's outbox connection is closed with it."""
        if self.run_relay:
            self.relay.flush()
        else:
            self.flush_signal.send()
        self.context.outbox.release_connection()

    def _normalized(self, request: NormalizedRequest) -> NormalizedResponse:
        """DIMSE-N requests by SOP Class: Storage Commitment's N-ACTION, MPPS's N-CREATE and
        N-SET (which refuses any other class)."""
        if request.sop_class_uid == STORAGE_COMMITMENT:
            return handle_commitment(request, self.commitment)
        return handle_procedure_step(request, self.context)

    def start(self) -> None:
        """Open the outbox, start the relay, bind the DICOM and HTTP ports."""
        s = self.settings
        self.context.outbox.open()
        if self.primary:
            record_unrecorded(self.store, self.context)
            swept = self.store.sweep_temporaries()
            if swept:
                log.info("removed unacknowledged temporary files", extra={"count": swept})
            self.settler.start()
        if self.run_relay:
            self.relay.start()
            if s.workers > 1:
                self.flush_signal.serve(self.relay.flush)
        ssl_context = (
            server_ssl_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file)
            if s.tls_cert_file is not None and s.tls_key_file is not None
            else None
        )
        config = ServerConfig(
            contexts=presentation_contexts(s),
            incoming_dir=self.store.incoming,
            open_incoming=self.store.open_incoming,
            max_pdu_size=s.max_pdu_size,
            max_associations=s.max_associations,
            network_timeout_s=s.network_timeout_s,
            ssl_context=ssl_context,
            reuse_port=s.workers > 1,
        )
        server = StorageServer(
            config,
            self.policy.check,
            partial(handle_store, ctx=self.context),
            s.host,
            s.port,
            on_reject=self.policy.count_reject,
            on_association_end=self._association_ended,
            normalized=self._normalized,
        )
        self._server = server
        self._server_thread = threading.Thread(
            target=server.serve_forever, name="dicom-server", daemon=True
        )
        self._server_thread.start()
        if s.metrics_port and self.primary:
            self._http = HttpServer(
                s.host,
                s.metrics_port,
                http_app(self.metrics.registry, self.health, s.metrics_secret, s.host),
            )
            self._http.start()
            metrics_closed_warning(s.host, s.metrics_secret, "SCANWATCH_LISTENER_METRICS_TOKEN")
        log.info(
            "listening",
            extra={
                "ae_title": s.ae_title,
                "host": s.host,
                "port": self.port,
                "tls": ssl_context is not None,
                "storage_dir": str(s.storage_dir),
                "outbox": str(s.resolved_outbox_path),
                "listener_id": s.resolved_listener_id,
                "allowed_calling_aes": s.allowed_calling_aes or "any",
                "metrics_port": s.metrics_port or None,
                "primary": self.primary,
            },
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting associations, let running ones finish (up to ``grace_s``, then abort
        them: an aborted C-STORE was never answered with success), stop the relay."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            deadline = time.monotonic() + grace_s
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.flush_signal.close()
        self.settler.stop()
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
        listener_id=settings.resolved_listener_id,
        batch_size=settings.publish_batch_size,
        retry_max_s=settings.publish_retry_max_s,
        # Other processes' commits do not wake this relay: poll for them.
        idle_poll_s=settings.publish_poll_s if settings.workers > 1 else 1.0,
        linger_s=settings.publish_linger_s,
    )
    outbox.on_commit(relay.wake)
    metrics.track_outbox_depth(outbox.depth)
    policy = AssociationPolicy(settings.ae_title, settings.allowed_calling_aes, metrics)
    reporter = CommitmentReporter(settings.ae_title, settings.commitment_addresses(), metrics)
    return ListenerApp(
        settings,
        context,
        relay,
        policy,
        store,
        CommitmentContext(outbox, store, metrics, reporter.deliver),
        primary=primary,
        run_relay=run_relay,
    )
