"""Child processes that must not outlive their parent."""

from __future__ import annotations

import ctypes
import signal
import sys

#: prctl(2) option: the signal this process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent dies, even by
    SIGKILL. Returns False where that cannot be arranged (not Linux, or prctl failed)."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig)) == 0)
    except (OSError, AttributeError):
        return False
