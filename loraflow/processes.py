"""Child processes that never outlive the process that started them (Linux: the kernel's parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (a no-op off Linux).

    Call it in the child: in a Popen preexec_fn, or first thing in a process a launcher started. A parent that
    died before the call leaves the child re-parented already; then the signal is sent at once."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def end_with_parent_sigterm() -> None:
    """Popen preexec_fn: SIGTERM this child when the parent dies, so it can end its own children in turn."""
    end_with_parent(signal.SIGTERM)
