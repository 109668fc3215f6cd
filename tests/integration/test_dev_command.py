"""`ocpi-pipeline dev` as a user runs it: ready quickly, usable by `query` meanwhile, gone on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.kafka.embedded import free_port

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

# From the command to the versions URL and Token A: broker, chDB, migrations, worker and receivers started. It took
# 16 s on a loaded two-core machine (20 s was the bound): a generous bound that still catches a start that hangs.
READY_WITHIN_S = 60


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (the broker, worker and receivers of a dev instance)."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                child = int(entry.name)
                found.add(child)
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state != "Z"


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCPI_")}
    env.update({"OCPI_DATA_DIR": str(tmp_path / "data"), "OCPI_HTTP_PORT": str(free_port())})
    return env


def start_dev(env: dict[str, str]) -> tuple[subprocess.Popen[str], dict[str, str], float]:
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "dev"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    lines: dict[str, str] = {}
    assert process.stdout is not None
    while time.monotonic() - started < READY_WITHIN_S + 10:
        line = process.stdout.readline()
        if not line:
            break
        key, _, value = line.partition(": ")
        lines[key.strip()] = value.strip()
        if key.startswith("Token A") or "adds another" in line:  # or where the first partner stands
            break
    return process, lines, time.monotonic() - started


@pytest.fixture
def dev(dev_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], float]]:
    process, lines, elapsed = start_dev(dev_env)
    yield process, lines, elapsed
    if process.poll() is None:
        process.kill()
        process.wait(10)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_dev_is_ready_in_time_and_leaves_nothing_behind(dev_env: dict[str, str], stop_signal: int) -> None:
    process, lines, elapsed = start_dev(dev_env)
    try:
        assert "versions URL" in lines, lines
        assert elapsed < READY_WITHIN_S, f"ready after {elapsed:.1f}s"
        assert lines["versions URL"] == f"http://127.0.0.1:{dev_env['OCPI_HTTP_PORT']}/ocpi/versions"
        assert any(k.startswith("Token A") for k in lines), lines
        children = descendants(process.pid)
        assert len(children) >= 3  # broker, worker, receivers (and their helpers)
        process.send_signal(stop_signal)
        assert process.wait(60) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)]
        assert not (Path(dev_env["OCPI_DATA_DIR"]) / "run" / "instance.json").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_query_and_migrate_work_while_dev_holds_the_store(dev, dev_env: dict[str, str]) -> None:
    _process, lines, _ = dev
    assert "versions URL" in lines, lines
    result = cli(dev_env, "query", "--format", "csv", "SELECT count() AS n FROM schema_migrations")
    assert result.returncode == 0, result.stderr
    header, value = result.stdout.strip().splitlines()
    assert header == "n" and int(value) >= 5

    as_json = cli(dev_env, "query", "--format", "json", "SELECT 1 AS one")
    assert as_json.returncode == 0 and '"one": 1' in as_json.stdout

    refused = cli(dev_env, "query", "INSERT INTO dead_letters (error) VALUES ('x')")
    assert refused.returncode != 0 and "readonly" in (refused.stderr + refused.stdout).lower()

    migrated = cli(dev_env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "schema up to date" in migrated.stdout


def test_query_without_a_running_instance_opens_the_store_itself(dev_env: dict[str, str]) -> None:
    assert cli(dev_env, "migrate").returncode == 0
    result = cli(dev_env, "query", "--format", "csv", "SELECT count() FROM sessions FINAL")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_demo_stopped_by_sigterm_removes_its_data_and_children(dev_env: dict[str, str], tmp_path: Path,
                                                               sigint_ignored: bool) -> None:
    # SIGTERM's default ended demo at once: its children died (watchdog), its temporary data directory stayed.
    # Then SIGTERM was turned into a SIGINT, which a process started in the background by a script (`demo &`:
    # the shell sets SIGINT to ignored) ignores: SIGTERM did nothing, and the demo ran on to its end.
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**dev_env, "TMPDIR": str(temp)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "demo", "--sessions", "2000"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_ignore_sigint if sigint_ignored else None)
    try:
        deadline = time.monotonic() + READY_WITHIN_S + 30
        while len(descendants(process.pid)) < 3 and time.monotonic() < deadline:  # the stack is up
            time.sleep(0.2)
        children = descendants(process.pid)
        assert len(children) >= 3 and list(temp.glob("ocpi-demo-*"))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 1  # stopped ("Aborted!"), not run to its end
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if alive(pid)]
        assert not list(temp.glob("ocpi-demo-*"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
