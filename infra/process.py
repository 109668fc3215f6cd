"""Child processes that never outlive their parent, and are stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

# Runs in the child, then execs the real command: it asks Linux for SIGTERM when the parent dies (even by
# SIGKILL), and gives up if the parent is already gone. A `preexec_fn` would do the same, but it forces
# fork() + Python in the child, which deadlocks when the parent holds chDB's threads and locks.
_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "try: ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError): pass\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(cmd: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-S", "-c", _TRAMPOLINE, str(os.getpid()), *cmd]


def spawn(cmd: Sequence[str], *, env: Mapping[str, str], log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own session (a terminal's Ctrl-C reaches only us; we stop children ourselves)."""
    out: int | IO[bytes] = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
    try:
        return subprocess.Popen(_with_parent_death_signal(cmd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True)
    finally:
        if not isinstance(out, int):
            out.close()  # the child holds its own descriptor


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code."""
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
    return process.returncode
