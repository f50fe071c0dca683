"""Thin wrappers over the real DICOM peers from Debian's dcmtk (``storescu``, ``echoscu``).

They are the same tools a hospital engineer would use to poke the listener, so the demos and
the tests exercise it exactly as a scanner would. ``TCP_NODELAY=1`` is always set: without it
dcmtk's small PDUs meet Nagle's algorithm and every round trip waits ~40 ms.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

STORESCU = "storescu"
ECHOSCU = "echoscu"
DEFAULT_CALLED_AE = "SCANWATCH"
DEFAULT_CALLING_AE = "STORESCU"
#: Seconds dcmtk waits for a TCP connect, an ACSE message and a DIMSE message, each.
DEFAULT_TIMEOUT_S = 30.0
#: Keep each storescu command line well under Linux's argument limits; longer lists of files
#: are sent in several associations, one after the other.
MAX_ARGS_CHARS = 100_000


class PeerError(RuntimeError):
    """A dcmtk tool failed; the message carries its exit status and what it logged."""

    def __init__(self, message: str, returncode: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output


def dcmtk_env() -> dict[str, str]:
    """The environment for a dcmtk tool: the caller's, plus ``TCP_NODELAY=1``."""
    return {**os.environ, "TCP_NODELAY": "1"}


def _timeouts(timeout: float) -> list[str]:
    seconds = str(max(1, round(timeout)))
    return ["-to", seconds, "-ta", seconds, "-td", seconds]


def _targets(files: Sequence[Path] | Path) -> tuple[list[str], list[list[str]]]:
    """Scan options and the groups of paths to send, one group per association."""
    if isinstance(files, str | os.PathLike) and Path(files).is_dir():
        return ["+sd", "+r"], [[str(files)]]
    if isinstance(files, str | os.PathLike):
        return [], [[str(files)]]
    return [], list(_chunks([str(f) for f in files]))


def _chunks(paths: list[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for path in paths:
        if chunk and size + len(path) + 1 > MAX_ARGS_CHARS:
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += len(path) + 1
    if chunk:
        yield chunk


def _storescu_argv(
    paths: Sequence[str],
    scan: Sequence[str],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout: float,
    verbose: bool,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        STORESCU,
        *(["-v"] if verbose else []),
        "-aec",
        called_ae,
        "-aet",
        calling_ae,
        *_timeouts(timeout),
        *extra,
        *scan,
        host,
        str(port),
        *paths,
    ]


def storescu_command_line(
    files: Sequence[Path] | Path,
    host: str,
    port: int,
    called_ae: str = DEFAULT_CALLED_AE,
    calling_ae: str = DEFAULT_CALLING_AE,
) -> str:
    """The shell line that sends ``files`` (a folder is scanned recursively), ready to paste."""
    scan, groups = _targets(files)
    paths = [p for group in groups for p in group]
    argv = [STORESCU, "-aec", called_ae, "-aet", calling_ae, *scan, host, str(port), *paths]
    return "TCP_NODELAY=1 " + shlex.join(argv)


def _failure_lines(output: str) -> str:
    """What storescu said about the failure: non-success responses and its errors."""
    keep = [
        line
        for line in output.splitlines()
        if line.startswith(("E:", "F:", "W:"))
        or ("Received Store Response" in line and "(Success)" not in line)
    ]
    return "\n".join(keep[-20:]) or output.strip()[-2000:]


def storescu(
    files: Sequence[Path] | Path,
    host: str,
    port: int,
    called_ae: str = DEFAULT_CALLED_AE,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout: float = DEFAULT_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk ``storescu``; raise :class:`PeerError` unless all succeed.

    ``files`` is a list of Part 10 files (sent in as few associations as the command line
    allows) or a folder (scanned recursively with ``+sd +r``). ``extra_args`` go to storescu
    before the peer's address (e.g. ``tls_args(...)`` for DICOM TLS). storescu stops at the first
    C-STORE that does not succeed and exits non-zero; the error names the status it got.
    ``timeout`` bounds each network step (connect, association, each response). Returns the
    last storescu run.
    """
    scan, groups = _targets(files)
    if not groups:
        raise PeerError("no files to send")
    results: list[subprocess.CompletedProcess[str]] = []
    for group in groups:
        argv = _storescu_argv(
            group, scan, host, port, called_ae, calling_ae, timeout, True, extra_args
        )
        try:
            result = subprocess.run(
                argv, env=dcmtk_env(), capture_output=True, text=True, check=False
            )
        except FileNotFoundError as exc:
            raise PeerError(f"{STORESCU} not found; install dcmtk") from exc
        if result.returncode != 0:
            output = result.stdout + result.stderr
            raise PeerError(
                f"storescu to {called_ae}@{host}:{port} failed (exit {result.returncode}):\n"
                + _failure_lines(output),
                result.returncode,
                output,
            )
        results.append(result)
    return results[-1]


def echoscu(
    host: str,
    port: int,
    called_ae: str = DEFAULT_CALLED_AE,
    calling_ae: str = "ECHOSCU",
    timeout: float = 5.0,
    extra_args: Sequence[str] = (),
) -> bool:
    """True when the peer accepts an association and answers C-ECHO with success."""
    argv = [
        ECHOSCU,
        "-aec",
        called_ae,
        "-aet",
        calling_ae,
        *_timeouts(timeout),
        *extra_args,
        host,
        str(port),
    ]
    try:
        result = subprocess.run(
            argv, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout * 4
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def tls_args(key_file: Path | None, cert_file: Path | None, ca_file: Path) -> list[str]:
    """dcmtk options for DICOM TLS: our key and certificate (None: anonymous TLS, no client
    certificate) and the CA that must have signed the peer's certificate."""
    own = ["+tls", str(key_file), str(cert_file)] if key_file and cert_file else ["+tla"]
    return [*own, "+cf", str(ca_file), "-rc"]
