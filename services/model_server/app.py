"""Composition root of the model server: settings + engine → a startable gRPC server."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from services.model_server.config import Settings
from services.model_server.engine import Engine, TensorFlowEngine
from services.model_server.handlers import Models, ModelServicer, PredictionServicer
from services.model_server.manager import ModelManager

logger = logging.getLogger(__name__)


class ModelServer:
    """The gRPC server and the repository poller; nothing runs until :meth:`start`."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.manager = ModelManager(
            settings.model_name, settings.model_dir, engine, settings.version_labels
        )
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (after :meth:`start`)."""
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> int:
        """Listen, start polling the repository (the first poll runs at once); return the port."""
        limit = self.settings.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.settings.max_workers, thread_name_prefix="model-server"
            ),
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        models = Models({self.manager.name: self.manager})
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(models), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(models), server)
        host = self.settings.host
        bind = f"[{host}]:{self.settings.port}" if ":" in host else f"{host}:{self.settings.port}"
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as error:  # newer grpc raises instead of returning 0
            raise OSError(f"cannot listen on {bind}: {error}") from error
        if port == 0:
            raise OSError(f"cannot listen on {bind}")
        server.start()
        self._server, self.port = server, port
        self._poller = threading.Thread(
            target=self.manager.run_polling,
            args=(self._stop, self.settings.poll_interval_s),
            name="model-repository-poller",
            daemon=True,
        )
        self._poller.start()
        logger.info(
            "model server listening",
            extra={
                "address": self.address,
                "model_name": self.manager.name,
                "model_dir": str(self.manager.model_dir),
                "engine": self.manager.engine.name,
            },
        )
        return port

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop polling, let in-flight calls finish for up to ``grace_s``, then close."""
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
        if self._poller is not None:
            self._poller.join()
        logger.info("model server stopped", extra={"model_name": self.manager.name})


def create_server(settings: Settings, engine: Engine | None = None) -> ModelServer:
    """Build the model server; TensorFlow runs the models unless another engine is given."""
    return ModelServer(settings, engine or TensorFlowEngine())
