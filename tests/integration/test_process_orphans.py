"""Children started by `infra.process.spawn` go away with their parent, even a SIGKILLed one, even when they
ignore SIGTERM, and so does everything they started (the way granian's workers hang below granian)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.process import ORPHAN_GRACE_S, spawn

pytestmark = [pytest.mark.integration]

# argv[1]: where to write "child-pid grandchild-pid". Both ignore SIGTERM.
CHILD = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""

# A parent like `dev`: spawns the child, then lives until it is killed. argv[1] as for CHILD.
PARENT = """
import os, sys, time
from infra.process import spawn
spawn([sys.executable, "-c", sys.argv[2], sys.argv[1]], env=os.environ)
time.sleep(600)
"""

GONE_WITHIN_S = ORPHAN_GRACE_S + 5


def session_members(session: int) -> set[int]:
    """Live (not zombie) processes of a session: a spawned child leads its own, with all it started."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[3]) == session:
            found.add(int(entry.name))
    return found


def read_pids(path: Path, timeout: float = 15.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the child did not start its grandchild in time"
        time.sleep(0.05)
    child, grandchild = path.read_text().split()
    return int(child), int(grandchild)


def wait_until_empty(session: int, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := session_members(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def started() -> Iterator[list[int]]:
    """PIDs a test started; whatever of them (and of their sessions) is still alive is SIGKILLed at the end."""
    pids: list[int] = []
    yield pids
    for leftover in {*pids, *(member for pid in pids for member in session_members(pid))}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death handling is Linux only")
def test_a_child_ignoring_sigterm_and_its_own_child_die_with_a_sigkilled_parent(tmp_path: Path,
                                                                                started: list[int]) -> None:
    pids_file = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pids_file), CHILD], cwd=Path(__file__).parents[2],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(parent.pid)
    child, grandchild = read_pids(pids_file)
    started.extend((child, grandchild))
    assert {child, grandchild} <= session_members(child)

    parent.kill()
    parent.wait(10)
    killed_at = time.monotonic()
    assert wait_until_empty(child, GONE_WITHIN_S) == set()  # the child, the grandchild and the watchdog
    assert time.monotonic() - killed_at >= ORPHAN_GRACE_S - 1  # SIGTERM was ignored: gone by the escalation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death handling is Linux only")
def test_what_a_killed_child_leaves_in_its_session_is_killed(tmp_path: Path, started: list[int]) -> None:
    pids_file = tmp_path / "pids"
    process = spawn([sys.executable, "-c", CHILD, str(pids_file)], env=os.environ)
    started.append(process.pid)
    child, grandchild = read_pids(pids_file)
    started.append(grandchild)
    assert child == process.pid

    process.kill()  # as `terminate` does when SIGTERM is not enough: the grandchild is orphaned
    process.wait(10)
    assert wait_until_empty(child, 5) == set()
