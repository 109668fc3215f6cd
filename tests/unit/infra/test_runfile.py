"""The run file: found while its process lives, ignored once it is gone, also when another process got its PID."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.runfile import RunningInstance, process_start, read_running_instance, write_running_instance


@pytest.fixture
def live_pid() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _instance(pid: int, started: str) -> RunningInstance:
    return RunningInstance(pid=pid, versions_url="http://127.0.0.1:1/ocpi/versions", admin_url="http://127.0.0.1:1",
                           clickhouse_url="http://ocpi:t@127.0.0.1:2", admin_token="t", kafka_bootstrap="127.0.0.1:3",
                           started=started)


def test_the_run_file_of_a_live_instance_is_found(tmp_path: Path, live_pid: int) -> None:
    instance = _instance(live_pid, process_start(live_pid))
    write_running_instance(tmp_path, instance)
    assert read_running_instance(tmp_path) == instance


def test_a_run_file_whose_pid_another_process_took_is_stale(tmp_path: Path, live_pid: int) -> None:
    # `dev` was killed (SIGKILL, OOM, power) and left its run file; the PID now names an unrelated process.
    # Taken for the instance, `query` and `partners` went to a shim nobody serves, and another `dev` would not start.
    started = process_start(live_pid)
    assert started
    write_running_instance(tmp_path, _instance(live_pid, str(int(started) - 1)))
    assert read_running_instance(tmp_path) is None


def test_a_run_file_of_a_dead_process_is_stale(tmp_path: Path) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    write_running_instance(tmp_path, _instance(process.pid, ""))
    assert read_running_instance(tmp_path) is None


def test_a_run_file_written_before_the_start_time_was_recorded_is_read_by_pid(tmp_path: Path) -> None:
    path = write_running_instance(tmp_path, _instance(os.getpid(), ""))
    raw = path.read_text().replace(', "started": ""', "")
    assert "started" not in raw
    path.write_text(raw)
    assert read_running_instance(tmp_path) == _instance(os.getpid(), "")
