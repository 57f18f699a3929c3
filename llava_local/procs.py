"""Child processes that run llama.cpp (the caption worker, the server's engine): tied to their
parent's life, and their ends named for people."""
from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (even by SIGKILL), so none is orphaned."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def signal_name(exitcode: int | None) -> str:
    """How a process ended: "SIGABRT", "exit status 1"."""
    if exitcode is None:
        return "unknown status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


def spawn(target, args: tuple, name: str):
    """Start `target(conn, *args)` in a spawned daemon process; (process, this side's connection)."""
    ctx = multiprocessing.get_context("spawn")     # never fork a process that holds llama.cpp or CUDA state
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
    proc.start()
    child.close()
    return proc, parent
