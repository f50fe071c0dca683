"""A throw-away Orthanc (Debian package ``orthanc``) for tests and benchmarks.

:class:`LocalOrthanc` writes a configuration with free ports and its own storage folder,
starts ``Orthanc`` with ``TCP_NODELAY=1`` (it is built on dcmtk, which otherwise waits on
Nagle's algorithm), waits for its REST API, and stops it. Through the REST API it can upload
Part 10 files and push resources to a DICOM modality (``/modalities/{id}/store``), which is how
a real PACS forwards a study to the listener.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

ORTHANC = "Orthanc"
#: Longest wait for Orthanc's REST API after start.
START_TIMEOUT_S = 30.0


class OrthancError(RuntimeError):
    """Orthanc could not be started or refused a request."""


class LocalOrthanc:
    """One Orthanc process whose state lives under ``home``."""

    def __init__(
        self,
        home: Path,
        http_port: int,
        dicom_port: int,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.home = Path(home)
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """The running Orthanc's process id (its own process group); None when stopped."""
        return self._proc.pid if self._proc is not None else None

    def config(self) -> dict[str, Any]:
        return {
            "Name": "scanwatch-test-orthanc",
            "StorageDirectory": str(self.home / "storage"),
            "IndexDirectory": str(self.home / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "StorageCompression": False,
            "Plugins": [],
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            **self.extra_config,
        }

    def start(self) -> None:
        if shutil.which(ORTHANC) is None:
            raise OrthancError("Orthanc not found; install the Debian package 'orthanc'")
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        log = open(self.home / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [ORTHANC, "--logdir=" + str(self.home), str(config)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited; see {self.home}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {START_TIMEOUT_S}s; see {self.home}")

    def upload(self, files: Iterable[Path]) -> list[dict[str, Any]]:
        """POST each Part 10 file to ``/instances``; return Orthanc's answers."""
        answers = []
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for path in files:
                rsp = client.post("/instances", content=Path(path).read_bytes())
                if rsp.status_code != 200:
                    raise OrthancError(f"upload of {path} failed: {rsp.status_code} {rsp.text}")
                answers.append(rsp.json())
        return answers

    def store_to(self, modality: str, resources: list[str], timeout: float = 120) -> Any:
        """Push resources (Orthanc ids of studies, series or instances) with C-STORE
        (``POST /modalities/{modality}/store``, synchronous); raise unless all succeeded."""
        rsp = httpx.post(
            f"{self.url}/modalities/{modality}/store",
            json={"Resources": resources, "Synchronous": True},
            timeout=timeout,
        )
        if rsp.status_code != 200:
            raise OrthancError(f"store to {modality} failed: {rsp.status_code} {rsp.text}")
        return rsp.json()

    def get(self, path: str) -> Any:
        rsp = httpx.get(f"{self.url}{path}", timeout=30)
        rsp.raise_for_status()
        return rsp.json()

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
