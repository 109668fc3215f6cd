"""What every job shares: checkpoint files, time arguments, module names and progress reporting."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from infra.settings import Settings

MODULES = ("locations", "sessions", "cdrs")


class JobError(RuntimeError):
    """A job cannot run as asked; the message says why and what to do (the CLI prints it, no traceback)."""


def jobs_dir(settings: Settings, kind: str) -> Path:
    """Where jobs of one kind keep their checkpoints: `OCPI_DATA_DIR/jobs/<kind>/`."""
    return settings.storage.path / "jobs" / kind


def job_id(kind: str, spec: Mapping[str, Any]) -> str:
    """A stable id for a job spec: the same command line resumes the same job."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{kind}-{digest}"


class Checkpoint:
    """A JSON document on disk, replaced atomically (write temp, fsync, rename): never half written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise JobError(f"checkpoint {self.path} is not valid JSON ({exc}); remove it to start over") from None
        return data if isinstance(data, dict) else None

    def save(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def running_alone(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (created if missing) while the job runs; a second run of the same job
    (another terminal, a scheduled one) is refused with a JobError instead of working beside the first.

    Two runs of one job would share its checkpoint and files: each overwrites the other's position, deletes
    the other's temporary files, and a rebuild's second run would exchange the tables back. The lock is the
    kernel's (flock): it goes with the process, so a killed run leaves nothing to clean up.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(f"{what} is running already (another process holds {lock}); wait for it to end, "
                           "or stop it: run the same command again afterwards to resume") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from the command line, as an aware UTC datetime.

    Accepts an ISO 8601 timestamp (`2024-05-01T12:00:00Z`; with an offset it is converted; without a zone it
    means UTC, as in OCPI), a date (`2024-05-01` = its midnight UTC), or a duration back from now (`90m`,
    `6h`, `2d`, `1w`).
    """
    text = text.strip()
    relative = _RELATIVE.match(text)
    try:
        if relative:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[relative[2]]: int(relative[1])})
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(text)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: before year 1 (a duration that long, an offset at year 1)
        raise JobError(f"{text!r} is not a time: use 2024-05-01T12:00:00Z, 2024-05-01 or a duration like 6h") from None


def relative_text(text: str | None) -> str | None:
    """A time argument as typed when it is a duration back from now (`6h`), else None.

    A job's spec (so its id, and whether a rerun resumes it) names such an argument by this text: the instant
    it resolves to moves with every run. The job keeps the instant it resolved to when it started.
    """
    if text is None:
        return None
    text = text.strip()
    return text if _RELATIVE.match(text) else None


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


def from_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def check_modules(modules: Iterable[str]) -> tuple[str, ...]:
    """Module identifiers in a fixed order; all of them when none is given."""
    wanted = {m.lower() for m in modules}
    unknown = wanted - set(MODULES)
    if unknown:
        raise JobError(f"unknown module(s) {sorted(unknown)}; expected {', '.join(MODULES)}")
    return tuple(m for m in MODULES if m in wanted) if wanted else MODULES


class JobProgress(Protocol):
    """What a job reports while it runs (a rich progress bar in the CLI, nothing in tests)."""

    def start(self, description: str, total: int | None) -> None: ...
    def set_total(self, total: int | None) -> None: ...
    def advance(self, amount: int = 1) -> None: ...
    def note(self, message: str) -> None: ...


class NoProgress:
    def start(self, description: str, total: int | None) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class _RateColumn(ProgressColumn):
    """Records per second (rich's own speed column is for bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "–/s", style="progress.data.speed")


class RichProgress:
    """A rich progress bar with count, rate, elapsed time and ETA; one task at a time. A context manager."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=console or Console(stderr=True), transient=False)
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def start(self, description: str, total: int | None) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
        self._task = self._progress.add_task(description, total=total)

    def set_total(self, total: int | None) -> None:
        if self._task is not None:
            self._progress.update(self._task, total=total)

    def advance(self, amount: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def note(self, message: str) -> None:
        self._progress.console.print(message)


T = TypeVar("T")


async def uninterrupted(step: Awaitable[T]) -> T:
    """Run one durable step (send a batch and wait for the acks, then save the checkpoint) to its end even when
    the job is cancelled meanwhile (Ctrl-C under asyncio.run), and only then let the cancellation through.

    So an interrupted job has recorded everything it sent, and its rerun sends nothing twice. (A crash can
    still land inside a step: then the rerun sends that batch again, which deduplication makes harmless.)
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
