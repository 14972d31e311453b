"""Starting a child process that leaves Ctrl-C to its parent (no torch imported here).

Ctrl-C reaches the whole foreground process group; a spawned child still importing torch dies
of it with a C++ "terminate called ... KeyboardInterrupt". The parent decides what a Ctrl-C
stops, so its children are started with SIGINT ignored from birth. Used by the tensor-parallel
workers (fast.distributed.driver) and the server's engine process (fast.api.engine_process).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["start_ignoring_sigint"]


def start_ignoring_sigint(proc: Any) -> None:
    """``proc.start()`` with SIGINT ignored while the child is created (the child inherits
    SIG_IGN; the parent's handler is restored at once). Off the main thread, where handlers
    cannot be set, it simply starts the process."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)
