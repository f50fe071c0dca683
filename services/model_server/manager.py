"""Versions of one model: discovery, loading, switching, unloading and request resolution.

Version policy is TF Serving's default, "latest": the highest servable version under the model
folder is loaded, traffic moves to it once it is ready, then the previous version is unloaded.
A version that fails to load is skipped (the next lower one is served) until its
``saved_model.pb`` changes. Folders that are not integers or lack ``saved_model.pb`` are ignored,
which is what makes publishing by rename safe.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_pb2

from services.model_server.engine import Engine, Servable
from services.model_server.errors import InvalidArgument, NotFound, Unavailable
from training.repository import SAVED_MODEL_FILE, published_versions

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
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
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.engine = engine
        self.version_labels = dict(version_labels or {})
        self._lock = threading.Lock()  # guards _loaded and _statuses
        self._poll_lock = threading.Lock()  # one poll at a time
        self._loaded: Loaded | None = None
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
        loaded = self._loaded
        if loaded is None:
            raise Unavailable(f"Model {self.name} has no version loaded yet")
        if requested is not None and requested != loaded.version:
            raise NotFound(
                f"Servable not found for request: {describe_request(self.name, requested)}"
            )
        return loaded

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
        loaded = self._loaded
        return None if loaded is None else loaded.version

    # -- polling ----------------------------------------------------------------------------

    def poll(self) -> None:
        """Scan the model folder once and converge on the highest servable version."""
        with self._poll_lock:
            present = published_versions(self.model_dir)
            self._log_missing(present)
            current = self.loaded_version
            for version in sorted(present, reverse=True):
                if version == current:
                    return  # already serving the best loadable version
                if self._failed_before(version):
                    continue
                if self._load_and_switch(version):
                    return
            if current is not None:
                # Its folder is gone and nothing present could replace it.
                logger.warning(
                    "loaded version removed from the repository",
                    extra={"model_name": self.name, "model_version": current},
                )
                self._switch(None)

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

    def _load_and_switch(self, version: int) -> bool:
        extra = {"model_name": self.name, "model_version": version, "engine": self.engine.name}
        logger.info("loading model version", extra=extra)
        self._set_status(version, VersionStatus(LOADING))
        mtime = self._mtime(version)
        try:
            servable = self.engine.load(self.model_dir / str(version))
        except Exception as error:
            logger.exception("loading model version failed", extra=extra)
            self._failed[version] = mtime
            self._set_status(
                version, VersionStatus(END, UNKNOWN, f"{type(error).__name__}: {error}")
            )
            return False
        self._failed.pop(version, None)
        self._switch(Loaded(version, servable))
        logger.info("serving model version", extra=extra)
        return True

    def _switch(self, new: Loaded | None) -> None:
        """Route traffic to ``new``, then unload the previous version.

        Requests already running on the old servable keep their reference and finish; it is
        freed when the last of them returns.
        """
        with self._lock:
            old, self._loaded = self._loaded, new
            if new is not None:
                self._statuses[new.version] = VersionStatus(AVAILABLE)
            if old is not None:
                self._statuses[old.version] = VersionStatus(UNLOADING)
        if old is not None:
            self._set_status(old.version, VersionStatus(END))
            logger.info(
                "unloaded model version",
                extra={"model_name": self.name, "model_version": old.version},
            )
