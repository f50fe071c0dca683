"""Composition root of the model server: settings + engine → a startable gRPC server."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from prometheus_client import make_wsgi_app
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from scanwatch.http_access import HttpServer, guard_wsgi, metrics_closed_warning
from services.model_server.config import Settings
from services.model_server.engine import Engine, TensorFlowEngine
from services.model_server.handlers import Models, ModelServicer, PredictionServicer
from services.model_server.manager import ModelManager
from services.model_server.metrics import Metrics
from services.model_server.tf_serving_files import ConfigError, ModelConfig, read_model_config

logger = logging.getLogger(__name__)


class ModelServer:
    """The gRPC server and the repository pollers; nothing runs until :meth:`start`."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self._batching = settings.batching()
        self.managers = {c.name: self._manager(c) for c in settings.model_configs()}
        self.models = Models(self.managers, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None
        self._metrics_server: HttpServer | None = None
        self._stop = threading.Event()
        self._pollers: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._config_poller: threading.Thread | None = None

    def _manager(self, config: ModelConfig) -> ModelManager:
        return ModelManager(
            config.name,
            config.base_path,
            self.engine,
            config.version_labels,
            config.policy,
            batching=self._batching,
            warm_up_versions=self.settings.warmup,
            metrics=self.metrics,
        )

    @property
    def manager(self) -> ModelManager:
        """The first configured model's manager (the only one with the single-model shortcut)."""
        return next(iter(self.managers.values()))

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
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.models), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.models), server
        )
        host = self.settings.host
        bind = f"[{host}]:{self.settings.port}" if ":" in host else f"{host}:{self.settings.port}"
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as error:  # newer grpc raises instead of returning 0
            raise OSError(f"cannot listen on {bind}: {error}") from error
        if port == 0:
            raise OSError(f"cannot listen on {bind}")
        if self.settings.metrics_port:
            token = self.settings.metrics_secret
            metrics = guard_wsgi(make_wsgi_app(self.metrics.registry), token, host)
            metrics_closed_warning(host, token, "SCANWATCH_MODEL_SERVER_METRICS_TOKEN")
            self._metrics_server = HttpServer(host, self.settings.metrics_port, metrics)
            self._metrics_server.start()
            self.metrics_port = self._metrics_server.port
        server.start()
        self._server, self.port = server, port
        for manager in self.managers.values():
            self._start_polling(manager)
        wait_s = self.settings.model_config_file_poll_wait_seconds
        if self.settings.model_config_file is not None and wait_s:
            self._config_poller = threading.Thread(
                target=self._poll_config, args=(wait_s,), name="config-poller", daemon=True
            )
            self._config_poller.start()
        logger.info(
            "model server listening",
            extra={
                "address": self.address,
                "models": self._describe(),
                "engine": self.engine.name,
                "batching": None if self._batching is None else vars(self._batching),
                "metrics_port": self.metrics_port,
            },
        )
        return port

    def _describe(self) -> dict[str, dict[str, object]]:
        return {
            m.name: {
                "base_path": str(m.model_dir),
                "policy": m.policy.describe(),
                "version_labels": m.version_labels,
            }
            for m in self.managers.values()
        }

    def _start_polling(self, manager: ModelManager) -> None:
        # One poller per model: a slow load of one model does not delay another's versions.
        stop = threading.Event()
        poller = threading.Thread(
            target=manager.run_polling,
            args=(stop, self.settings.poll_interval_s),
            name=f"poller-{manager.name}",
            daemon=True,
        )
        poller.start()
        self._pollers[manager.name] = (poller, stop)

    def _stop_polling(self, name: str) -> None:
        poller, stop = self._pollers.pop(name)
        stop.set()
        poller.join()

    def _poll_config(self, wait_s: float) -> None:
        while not self._stop.wait(wait_s):
            try:
                self.reload_config()
            except Exception:
                logger.exception("reloading the model config failed")

    def reload_config(self) -> None:
        """Re-read the model config file and converge on it, as TF Serving's config polling.

        New models start loading; removed ones are unloaded; a model whose base path changed is
        replaced; policies and labels of the others change in place. An unreadable or invalid
        file is logged and the current configuration kept.
        """
        if self.settings.model_config_file is None:
            return
        try:
            configs = {c.name: c for c in read_model_config(self.settings.model_config_file)}
        except ConfigError as error:
            logger.error("model config not reloaded", extra={"why": str(error)})
            return
        before = self._describe()
        managers = dict(self.managers)
        retired = [
            m
            for name, m in managers.items()
            if name not in configs or configs[name].base_path != m.model_dir
        ]
        for manager in retired:
            del managers[manager.name]
        added = []
        for name, config in configs.items():
            if name in managers:
                managers[name].reconfigure(config.policy, config.version_labels)
            else:
                managers[name] = self._manager(config)
                added.append(managers[name])
        self.managers = managers
        self.models.replace(managers)
        for manager in retired:
            self._stop_polling(manager.name)
            manager.close()
        for manager in added:
            self._start_polling(manager)
        if retired or added or self._describe() != before:
            logger.info("model config reloaded", extra={"models": self._describe()})

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop polling, let in-flight calls finish for up to ``grace_s``, then close."""
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
        if self._config_poller is not None:
            self._config_poller.join()
        for name in list(self._pollers):
            self._stop_polling(name)
        for manager in self.managers.values():
            manager.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        logger.info("model server stopped", extra={"models": sorted(self.managers)})


def create_engine(settings: Settings) -> Engine:
    """The engine the settings name; OpenVINO is imported only when it is chosen."""
    if settings.engine == "openvino":
        from services.model_server.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(
            settings.openvino_cache_dir,
            performance_hint=settings.openvino_performance_hint,
            inference_precision=settings.openvino_inference_precision,
        )
    return TensorFlowEngine()


def create_server(settings: Settings, engine: Engine | None = None) -> ModelServer:
    """Build the model server; the settings' engine runs the models unless one is given."""
    return ModelServer(settings, engine or create_engine(settings))
