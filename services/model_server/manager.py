"""Versions of one model: discovery, loading, warm-up, unloading and request resolution.

The version policy (TF Serving's: latest N — 1 by default —, all, or specific versions) picks
which versions found in the base path should be served. New versions go START → LOADING (load +
warm-up) → AVAILABLE; only then are versions the policy no longer wants taken out of service
(UNLOADING → END), so that traffic always has a version to go to. A version that fails to load
ends in END with its error and is skipped (the policy chooses again without it, so "latest"
falls back to the next lower version) until its ``saved_model.pb`` changes. Folders that are
not integers or lack ``saved_model.pb`` are ignored, which is what makes publishing by rename safe.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_pb2

from scanwatch.model_repository import SAVED_MODEL_FILE, published_versions
from services.model_server.batching import BatchingServable
from services.model_server.engine import Engine, Servable
from services.model_server.errors import InvalidArgument, NotFound, Unavailable
from services.model_server.metrics import Metrics
from services.model_server.tf_serving_files import BatchingParameters, VersionPolicy
from services.model_server.warmup import warm_up

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
START = State.Value("START")
LOADING = State.Value("LOADING")
AVAILABLE = State.Value("AVAILABLE")
UNLOADING = State.Value("UNLOADING")
END = State.Value("END")
#: ``tensorflow.error.Code`` shares gRPC's numbering.
OK = grpc.StatusCode.OK.value[0]
UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]


@dataclass(frozen=True)
class VersionStatus:
    """What GetModelStatus reports for one version."""

    state: int
    error_code: int = OK
    error_message: str = ""


@dataclass(frozen=True)
class Loaded:
    """The version that answers requests."""

    version: int
    servable: Servable


def describe_request(name: str, version: int | None) -> str:
    """TF Serving's wording for a servable request, used in NOT_FOUND messages."""
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


class ModelManager:
    """Loads the versions of one model from ``model_dir`` and resolves requests to one of them."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        engine: Engine,
        version_labels: dict[str, int] | None = None,
        policy: VersionPolicy | None = None,
        *,
        batching: BatchingParameters | None = None,
        warm_up_versions: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.engine = engine
        self.version_labels = dict(version_labels or {})
        self.policy = policy or VersionPolicy()
        self.batching = batching
        self.warm_up_versions = warm_up_versions
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()  # guards _loaded and _statuses
        self._poll_lock = threading.Lock()  # one poll at a time
        self._loaded: dict[int, Loaded] = {}
        self._statuses: dict[int, VersionStatus] = {}
        self._failed: dict[int, int] = {}  # version → saved_model.pb mtime when its load failed
        self._missing_logged = False

    # -- requests ---------------------------------------------------------------------------

    def requested_version(self, spec: model_pb2.ModelSpec) -> int | None:
        """The version a ModelSpec asks for (``None`` = latest); unknown labels are invalid."""
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            return spec.version.value
        if choice == "version_label":
            if spec.version_label not in self.version_labels:
                raise InvalidArgument(f"Unrecognized servable version label: {spec.version_label}")
            return self.version_labels[spec.version_label]
        return None

    def resolve(self, spec: model_pb2.ModelSpec) -> Loaded:
        """The loaded version that should answer a request with this ModelSpec."""
        requested = self.requested_version(spec)
        with self._lock:
            loaded = dict(self._loaded)
        if not loaded:
            raise Unavailable(f"Model {self.name} has no version loaded yet")
        if requested is None:
            return loaded[max(loaded)]
        if requested not in loaded:
            raise NotFound(
                f"Servable not found for request: {describe_request(self.name, requested)}"
            )
        return loaded[requested]

    def statuses(self, spec: model_pb2.ModelSpec) -> list[tuple[int, VersionStatus]]:
        """Version states for GetModelStatus, newest first (all versions, or the one asked for)."""
        requested = self.requested_version(spec)
        with self._lock:
            statuses = dict(self._statuses)
        if requested is not None:
            if requested not in statuses:
                raise NotFound(f"Could not find version {requested} of model {self.name}")
            return [(requested, statuses[requested])]
        if not statuses:
            raise Unavailable(f"Model {self.name} has no version loaded yet")
        return sorted(statuses.items(), reverse=True)

    @property
    def loaded_version(self) -> int | None:
        """The version answering "latest" requests (the highest loaded), if any."""
        with self._lock:
            return max(self._loaded, default=None)

    @property
    def loaded_versions(self) -> list[int]:
        """Every loaded version, ascending."""
        with self._lock:
            return sorted(self._loaded)

    def reconfigure(self, policy: VersionPolicy, version_labels: dict[str, int]) -> None:
        """New policy (applied at the next poll) and labels (at once), from a reloaded config."""
        self.policy = policy
        self.version_labels = dict(version_labels)

    # -- polling ----------------------------------------------------------------------------

    def poll(self) -> None:
        """Scan the model folder once and converge on the versions the policy wants."""
        with self._poll_lock:
            present = published_versions(self.model_dir)
            self._log_missing(present)
            while True:
                aspired = self.policy.choose([v for v in present if not self._failed_before(v)])
                with self._lock:
                    to_load = sorted(aspired - set(self._loaded), reverse=True)
                    for version in to_load:
                        self._statuses[version] = VersionStatus(START)
                loaded_all = all([self._load(version) for version in to_load])
                if loaded_all:
                    break
                # A failure leaves the candidates: choose again (latest falls back to the next).
            with self._lock:
                to_unload = sorted(set(self._loaded) - aspired)
            for version in to_unload:
                self._unload(version, gone=version not in present)

    def run_polling(self, stop: threading.Event, interval_s: float) -> None:
        """Poll until ``stop`` is set; a failing poll is logged and retried next interval."""
        while True:
            try:
                self.poll()
            except Exception:
                logger.exception(
                    "polling the model repository failed", extra={"model_name": self.name}
                )
            if stop.wait(interval_s):
                return

    def close(self) -> None:
        """Unload every version (server shutdown)."""
        with self._poll_lock:
            for version in self.loaded_versions:
                self._unload(version, gone=False)

    def _log_missing(self, present: list[int]) -> None:
        if present:
            self._missing_logged = False
        elif not self._missing_logged:
            self._missing_logged = True
            logger.warning(
                "no servable versions found",
                extra={"model_name": self.name, "model_dir": str(self.model_dir)},
            )

    def _mtime(self, version: int) -> int:
        try:
            return (self.model_dir / str(version) / SAVED_MODEL_FILE).stat().st_mtime_ns
        except OSError:
            return -1

    def _failed_before(self, version: int) -> bool:
        return version in self._failed and self._failed[version] == self._mtime(version)

    def _set_status(self, version: int, status: VersionStatus) -> None:
        with self._lock:
            self._statuses[version] = status

    def _warm_up_sizes(self) -> list[int]:
        return [1, *(self.batching.allowed_batch_sizes if self.batching else ())]

    def _load(self, version: int) -> bool:
        """Load and warm up ``version``, then make it AVAILABLE; False if that failed."""
        extra = {"model_name": self.name, "model_version": version, "engine": self.engine.name}
        logger.info("loading model version", extra=extra)
        self._set_status(version, VersionStatus(LOADING))
        mtime = self._mtime(version)
        path = self.model_dir / str(version)
        started = time.monotonic()
        try:
            servable = self.engine.load(path)
            runs = warm_up(servable, path, self._warm_up_sizes()) if self.warm_up_versions else 0
        except Exception as error:
            logger.exception("loading model version failed", extra=extra)
            self._failed[version] = mtime
            self._set_status(
                version, VersionStatus(END, UNKNOWN, f"{type(error).__name__}: {error}")
            )
            self.metrics.loads.labels(self.name, "failed").inc()
            return False
        self._failed.pop(version, None)
        if self.batching is not None:
            batch_sizes = self.metrics.batch_size.labels(self.name)
            servable = BatchingServable(
                servable,
                self.batching,
                observe_batch=batch_sizes.observe,
                name=f"batch-{self.name}-{version}",
            )
        with self._lock:
            self._loaded[version] = Loaded(version, servable)
            self._statuses[version] = VersionStatus(AVAILABLE)
        self.metrics.loads.labels(self.name, "ok").inc()
        self.metrics.load_seconds.labels(self.name).observe(time.monotonic() - started)
        self.metrics.available.labels(self.name, str(version), self.engine.name).set(1)
        logger.info("serving model version", extra={**extra, "warm_up_runs": runs})
        return True

    def _unload(self, version: int, *, gone: bool) -> None:
        """Take ``version`` out of service, then release it.

        Requests already running on it keep their reference and finish (a batching wrapper
        drains its queue first); the servable is freed when the last of them returns.
        """
        extra = {"model_name": self.name, "model_version": version}
        if gone:
            logger.warning("loaded version removed from the repository", extra=extra)
        with self._lock:
            loaded = self._loaded.pop(version)
            self._statuses[version] = VersionStatus(UNLOADING)
        self.metrics.available.remove(self.name, str(version), self.engine.name)
        if isinstance(loaded.servable, BatchingServable):
            loaded.servable.close()
        self._set_status(version, VersionStatus(END))
        logger.info("unloaded model version", extra=extra)
