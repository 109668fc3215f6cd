"""Child processes that never outlive their parent, and are stopped by PID.

How a child goes away when its parent dies, even by SIGKILL (Linux):
1. the kernel sends it SIGTERM (PR_SET_PDEATHSIG): a chance to stop cleanly;
2. a watchdog gives it ORPHAN_GRACE_S, then SIGKILLs every process of its session.

The death signal alone is not enough: a child may ignore or mishandle SIGTERM (granian was found orphaned),
and it is not inherited by the child's own children (cleared on fork), so granian's workers would survive.
SIGKILL as the death signal would have the same hole and take the worker's clean stop away. The unit is the
session, not the process tree: `spawn` makes the child a session leader, its descendants stay in that session
(unless they call setsid themselves) while an orphaned grandchild leaves the tree when it is reparented.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, NoReturn

ORPHAN_GRACE_S = 5.0  # from the parent's death to SIGKILL: the parent held the engines, nothing is left to finish
_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
_TRAMPOLINE = str(Path(__file__).resolve())
_KILL_FOR_AT_MOST_S = 10.0


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _with_parent_death_signal(cmd: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(cmd)
    # This very file is the trampoline: a fresh interpreter (-I: no user site, no script directory on the path;
    # -S: no site-packages) that arms the death signal and the watchdog, then execs the command. A `preexec_fn`
    # would force fork() + Python in the child, which deadlocks when the parent holds chDB's threads and locks.
    return [sys.executable, "-I", "-S", _TRAMPOLINE, str(os.getpid()), str(ORPHAN_GRACE_S), *cmd]


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
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code.

    Whatever the process leaves behind in its session (workers of a killed server) is killed by its watchdog.
    """
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


# --- the trampoline (runs in the child, before the command) ---------------------------------------------------


def _trampoline(parent: int, grace: float, cmd: list[str]) -> NoReturn:
    import ctypes

    prctl = ctypes.CDLL(None).prctl
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)  # the parent died before the death signal was armed
    try:
        parent_fd = os.pidfd_open(parent)
        own_fd = os.pidfd_open(os.getpid())
    except OSError:  # a kernel before 5.3: no watchdog, so the death signal has to be the sure one
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        if os.getppid() != parent:
            sys.exit(1)  # the parent died meanwhile: `parent_fd` may name a process that reused its PID
        _start_watchdog(parent_fd, own_fd, grace)
        os.close(parent_fd)
        os.close(own_fd)
    os.execvp(cmd[0], cmd)  # noqa: S606 - the argv the caller gave `spawn`, as Popen would run it


def _start_watchdog(parent_fd: int, child_fd: int, grace: float) -> None:
    """Fork the watchdog twice, so that it is not a child of the command: the command does not know it, would
    never reap it, and a shell's `wait` would wait for it. It stays in the session, which keeps the session id
    from being reused while it kills."""
    first = os.fork()
    if first:
        os.waitpid(first, 0)
        return
    try:
        if os.fork() == 0:
            _watch(parent_fd, child_fd, grace)
    finally:
        os._exit(0)


def _watch(parent_fd: int, child_fd: int, grace: float) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_NAME, b"spawn-watchdog")  # what `ps`/`top` show, instead of "python3"
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # a stop meant for the command's group; we leave once it is gone
    _keep_only_descriptors(parent_fd, child_fd)
    ready, _, _ = select.select([parent_fd, child_fd], [], [])
    if child_fd not in ready:  # the parent died; the child has had its SIGTERM
        select.select([child_fd], [], [], grace)
    _kill_session(os.getsid(0))


def _keep_only_descriptors(*keep: int) -> None:
    """Let go of everything else: an inherited pipe held open (Popen's exec-error pipe, a caller's stdout pipe)
    would make a reader wait for an EOF that only comes when the watchdog exits."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for entry in Path("/proc/self/fd").iterdir():
        fd = int(entry.name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _kill_session(session: int) -> None:
    """SIGKILL every live process of `session` but ourselves, until none is left (they may fork meanwhile)."""
    deadline = time.monotonic() + _KILL_FOR_AT_MOST_S
    while time.monotonic() < deadline:
        members = [pid for pid in _live_session_members(session) if pid != os.getpid()]
        if not members:
            return
        for pid in members:
            _kill_if_in_session(pid, session)
        time.sleep(0.05)


def _live_session_members(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _session_of(int(entry.name)) == session:
            found.append(int(entry.name))
    return found


def _session_of(pid: int) -> int | None:
    """The session of a live process (None for a zombie, which holds nothing, or a process that is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    state, session = fields[0], int(fields[3])
    return None if state in (b"Z", b"X") else session


def _kill_if_in_session(pid: int, session: int) -> None:
    # Through a pidfd opened before the check, so that a PID reused in between is never signalled.
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _session_of(pid) == session:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    _trampoline(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:])
