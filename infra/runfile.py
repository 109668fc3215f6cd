"""The run file of a `dev`/`demo` instance: how other processes find its ClickHouse shim."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.process import process_alive


@dataclass(frozen=True)
class RunningInstance:
    pid: int
    versions_url: str
    admin_url: str
    clickhouse_url: str
    admin_token: str
    kafka_bootstrap: str
    # Whether `kafka_bootstrap` is the instance's embedded Tansu broker (a `dev` started with OCPI_KAFKA_BOOTSTRAP
    # uses that Kafka instead). Run files written before this field only ever named an embedded broker.
    kafka_embedded: bool = True
    # `process_start(pid)` when the file was written: a PID alone may name another process after a crash (PIDs are
    # reused). Empty in run files written before this field, and where /proc cannot be read: the PID alone decides.
    started: str = ""


def runfile_path(data_dir: Path) -> Path:
    return data_dir / "run" / "instance.json"


def write_running_instance(data_dir: Path, instance: RunningInstance) -> Path:
    path = runfile_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # The file holds the admin token: owner-only permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(instance), fh)
    tmp.replace(path)
    return path


def remove_running_instance(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        runfile_path(data_dir).unlink()


def process_start(pid: int) -> str:
    """When process `pid` started (clock ticks after boot, field 22 of /proc/PID/stat), "" if that cannot be read.
    With the PID it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def read_running_instance(data_dir: Path) -> RunningInstance | None:
    """The instance that holds `data_dir`, or None (a stale file of a dead process is ignored, also when another
    process has its PID now)."""
    try:
        raw = json.loads(runfile_path(data_dir).read_text())
        instance = RunningInstance(**raw)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if not process_alive(instance.pid):
        return None
    if instance.started and process_start(instance.pid) not in ("", instance.started):
        return None  # the PID is another process's now: the instance died without removing its file
    return instance
