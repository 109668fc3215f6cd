"""The run file of a `dev`/`demo` instance: how other processes find its admin API and ClickHouse shim."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_running_instance(data_dir: Path) -> RunningInstance | None:
    """The instance that holds `data_dir`, or None (a stale file of a dead process is ignored)."""
    try:
        raw = json.loads(runfile_path(data_dir).read_text())
        instance = RunningInstance(**raw)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return instance if _alive(instance.pid) else None
