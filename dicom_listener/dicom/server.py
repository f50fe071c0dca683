"""The Storage SCP's server: accepts TCP (or DICOM TLS, PS3.15 B.1) connections and serves
each as an :class:`~dicom_listener.dicom.association.Association` on a daemon thread of its
own; ``serve_forever`` runs the accept loop."""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dicom_listener.dicom.association import Association, ServerConfig
from dicom_listener.dicom.contract import AdmitFn, NormalizedFn, StoreFn
from dicom_listener.dicom.pdu import ProtocolError

log = logging.getLogger(__name__)


class _Handler(socketserver.BaseRequestHandler):
    server: StorageServer

    def handle(self) -> None:
        server = self.server
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = str(self.client_address[0])
        try:
            if server.config.ssl_context is not None:
                sock.settimeout(server.config.network_timeout_s)
                sock = server.config.ssl_context.wrap_socket(sock, server_side=True)
            with server.tracked():
                Association(
                    sock,
                    address,
                    server.config,
                    server.admit,
                    server.store,
                    server.slots,
                    server.on_reject,
                    server.normalized,
                ).serve()
        except (ProtocolError, ssl.SSLError) as exc:
            log.warning("association aborted: %s", exc, extra={"peer_address": address})
        except (ConnectionError, TimeoutError, BlockingIOError) as exc:
            # BlockingIOError: the network timeout (SO_RCVTIMEO / SO_SNDTIMEO) passed.
            log.info("association ended: %r", exc, extra={"peer_address": address})
        finally:
            try:
                sock.close()
            except OSError:
                pass
            server.on_association_end()


class StorageServer(socketserver.ThreadingTCPServer):
    """Accepts associations, one daemon thread each; ``serve_forever`` runs the accept loop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        config: ServerConfig,
        admit: AdmitFn,
        store: StoreFn,
        host: str,
        port: int,
        on_reject: Callable[[str], None] = lambda reason: None,
        on_association_end: Callable[[], None] = lambda: None,
        normalized: NormalizedFn | None = None,
    ):
        self.config = config
        #: The N-CREATE / N-SET handler (Modality Performed Procedure Step), if served.
        self.normalized = normalized
        self.admit = admit
        self.store = store
        self.on_reject = on_reject
        #: Called once an association is over (released, aborted or refused): its sender
        #: has nothing more in flight, so what it stored can be published without waiting.
        self.on_association_end = on_association_end
        self.slots = threading.BoundedSemaphore(config.max_associations)
        self._active = 0
        self._lock = threading.Lock()
        config.incoming_dir.mkdir(parents=True, exist_ok=True)
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        if self.config.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def active_associations(self) -> int:
        """Connections being served (negotiating or associated)."""
        return self._active

    @contextmanager
    def tracked(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
