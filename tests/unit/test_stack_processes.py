"""The stack stops a service with every process the service started (Rasa's server runs its
worker processes as children: they outlived their parent and held 1.7 GB per stopped stack)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devtools.stack import Service, Stack, StackConfig
from devtools.testing import wait_for

#: A service that starts a child of its own, writes the child's pid, and waits for a signal
#: (both processes idle until they are signalled: no wait on time).
PARENT = """
import pathlib, signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
signal.pause()
"""


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its new parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def spawn_parent(stack: Stack, name: str, tmp_path: Path) -> int:
    pid_file = tmp_path / f"{name}.pid"
    service = Service(
        name=name,
        argv=[sys.executable, "-c", PARENT, str(pid_file)],
        env=dict(os.environ),
        healthy=lambda: True,
    )
    stack.services.append(service)
    stack._spawn(service)
    return int(wait_for(lambda: pid_file.is_file() and pid_file.read_text(), timeout=30))


def test_stop_and_kill_take_the_services_children_with_them(tmp_path: Path) -> None:
    stack = Stack(StackConfig(var=tmp_path, only=()))
    stack.logs.mkdir(parents=True)
    killed = spawn_parent(stack, "killed", tmp_path)
    stopped = spawn_parent(stack, "stopped", tmp_path)
    assert alive(killed) and alive(stopped)

    stack.kill("killed")  # kill -9 of a service (fault injection)
    wait_for(lambda: not alive(killed), timeout=30, what="the killed service's child gone")
    assert alive(stopped)

    stack.stop()
    wait_for(lambda: not alive(stopped), timeout=30, what="the stopped service's child gone")


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_the_scoring_services_can_run_below_the_listener_and_the_fhir_apis_priority(
    tmp_path: Path,
) -> None:
    stack = Stack(StackConfig(var=tmp_path, chatbot=True, scoring_nice=10))
    nice = {s.name: s.nice for s in stack.services}
    scoring = {"model-server", "inference-worker", "training-worker"}
    assert {name: n for name, n in nice.items() if n} == dict.fromkeys(scoring, 10)
    assert {"dicom-listener", "fhir-api", "chat", "portal"} <= set(nice)

    stack = Stack(StackConfig(var=tmp_path, only=()))
    stack.logs.mkdir(parents=True, exist_ok=True)
    pid_file = tmp_path / "niced.pid"
    service = Service(
        name="niced",
        argv=[sys.executable, "-c", PARENT, str(pid_file)],
        env=dict(os.environ),
        healthy=lambda: True,
        nice=7,
    )
    stack.services.append(service)
    stack._spawn(service)
    child = int(wait_for(lambda: pid_file.is_file() and pid_file.read_text(), timeout=30))
    assert service.process is not None
    # The service itself, not a nice wrapper, holds the pid the stack signals; its children
    # inherit the niceness.
    assert Path(f"/proc/{service.process.pid}/exe").resolve() == Path(sys.executable).resolve()
    assert niceness(service.process.pid) == niceness(child) == min(niceness(os.getpid()) + 7, 19)
    stack.stop()
    wait_for(lambda: not alive(child), timeout=30, what="the niced service's child gone")
