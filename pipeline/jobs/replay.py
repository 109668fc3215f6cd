"""Replay: send recorded events through the pipeline again, from Kafka or from archive files.

A replayed event is the recorded one with `source=REPLAY`: same event id, content hash, payload and key,
re-published to its module topic (`DecodedEvent.to_event()` → `infra.codec.encode_event`). The pipeline
treats it like any other event: every table is keyed by object identity or event id and keeps the newest
version, so a replay changes no total, however often it runs (the tests replay twice and compare).

Selection: modules, one partner, a time range on `received_at`, and for Kafka a partition and an offset
range. From Kafka, `since` is turned into start offsets first: ListOffsets by timestamp on a real Kafka, a
binary search over record timestamps on Tansu, for a request timeout before `since`, then a read on to `since`
(records of several producers land out of time order: `infra.kafka.compat.offsets_for_times`). A record's timestamp
is set when it is published, never before its `received_at`, so the scan starts at `since`; it goes on to
the end of the topics whatever `until` is (a replayed copy, the only one left of history restored from an
archive, is stamped when it was replayed, any time after its `received_at`), and the exact `received_at`
filter decides. The end of the topic is fixed when the job is planned: a replay never chases the records it
writes itself.

Within one job an event id is sent once, even if the source holds it several times (an earlier replay's
copies, an archive exported from both sources): the ids sent are logged next to the checkpoint.

Checkpoints: `OCPI_DATA_DIR/jobs/replay/<job>.json` holds the plan (offset ranges or archive files) and the
position reached, saved after each batch the broker acknowledged (`<job>.sent` lists the event ids sent). The
job id is derived from the command's selection (or given with `--job`), so after Ctrl-C the same command
resumes where it stopped: the batch in flight is finished and recorded before the job stops, so nothing is sent
twice (the same job started again while it runs is refused: `<job>.lock`). After a crash (no chance to finish
the batch) that batch is sent again, which the pipeline's deduplication makes harmless. A finished job is not
repeated unless asked (`again=True`, `--again`). A Kafka job resumed after its topics were recreated (the
embedded broker's come back empty on every start) plans those partitions again from what they hold now
(`_plan_recreated`). An archive job whose planned files are gone when it resumes
(replaced by a later export) plans again from the files there now; the ids logged as sent keep it from sending
an event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.structs import TopicPartition

from infra.codec import AvroCodecError, DecodedEvent, decode_event, encode_event
from infra.settings import Settings
from ocpi.identity import ObjectKey
from pipeline.jobs.archive import _first_record_at, archive_files, count_records, event_of, read_archive_file
from pipeline.jobs.common import (
    MODULES,
    Checkpoint,
    JobError,
    JobProgress,
    NoProgress,
    from_iso,
    iso,
    job_id,
    jobs_dir,
    running_alone,
    uninterrupted,
)
from pipeline.jobs.kafka_io import (
    JobProducer,
    PartitionRange,
    deleted_below,
    offset_bounds,
    offsets_at,
    partitions_of,
    read_ranges,
    topic_partitions,
    wait_for_group,
)
from pipeline.records import misfit

log = logging.getLogger(__name__)

BATCH = 500
REPLAY = "REPLAY"


@dataclass(frozen=True)
class Selection:
    """Which recorded events to replay."""

    modules: tuple[str, ...]
    partner: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    # --since/--until as typed when they are durations back from now (`common.relative_text`): the job's spec
    # names them so, and a resumed job goes on with the instants it resolved them to when it started.
    relative: tuple[str | None, str | None] = (None, None)

    def __post_init__(self) -> None:
        if self.since and self.until and self.since >= self.until:
            raise JobError("--since must be before --until")
        if self.from_offset is not None and self.to_offset is not None and self.from_offset >= self.to_offset:
            raise JobError("--from-offset must be below --to-offset")

    @property
    def by_offset(self) -> bool:
        return self.partition is not None or self.from_offset is not None or self.to_offset is not None

    def matches(self, event: DecodedEvent) -> bool:
        if self.partner is not None and event.partner_id != self.partner:
            return False
        if self.since is not None and event.received_at < self.since:
            return False
        return self.until is None or event.received_at < self.until

    def spec(self) -> dict[str, Any]:
        return {"modules": list(self.modules), "partner": self.partner, "since": self.relative[0] or iso(self.since),
                "until": self.relative[1] or iso(self.until), "partition": self.partition,
                "from_offset": self.from_offset, "to_offset": self.to_offset}

    def as_planned(self, state: dict[str, Any]) -> Selection:
        """This selection with the instants a resumed job resolved its time range to when it was planned."""
        resolved = state.get("resolved")
        if not resolved:
            return self
        return dataclasses.replace(self, since=from_iso(resolved["since"]), until=from_iso(resolved["until"]))

    def resolved(self) -> dict[str, str | None]:
        return {"since": iso(self.since), "until": iso(self.until)}


@dataclass
class PlanLine:
    """One unit of a replay plan: an offset range of a partition, or an archive file."""

    module: str
    where: str
    records: int  # offsets in the range / records in the file
    matching: int | None = None  # records the selection picks (dry run only)
    partition: tuple[str, int] | None = None  # (topic, partition) of a Kafka range


@dataclass
class ReplayReport:
    job: str
    status: str  # done, resumed-done, already-done, dry-run
    lines: list[PlanLine] = field(default_factory=list)
    sent: int = 0
    filtered: int = 0
    duplicates: int = 0
    undecodable: int = 0
    written: dict[TopicPartition, int] = field(default_factory=dict)
    # Partitions whose start the selection reaches before, which retention deleted ("<topic>/<p> (from offset N)").
    truncated: list[str] = field(default_factory=list)
    # Offset ranges retention deleted after the job planned, before it read them ("<topic>/<p> offsets a-b").
    lost: list[str] = field(default_factory=list)


class _Run:
    """The state one replay run shares between its source and the producer."""

    def __init__(self, settings: Settings, selection: Selection, report: ReplayReport) -> None:
        self.settings = settings
        self.selection = selection
        self.report = report
        self.seen: set[str] = set()
        self.unsaved: set[str] = set()  # logged as sent by a batch whose checkpoint a crash prevented
        self._log: Path | None = None
        self._batch_ids: list[str] = []

    def attach(self, log: Path, *, resume: bool, record: bool) -> None:
        """Keep the ids of sent events in `log` (one per line), so a resumed run skips the copies of events
        the interrupted run sent already (an earlier replay's copies later in the topic, for instance)."""
        if resume and log.exists():
            data = log.read_bytes()
            # A last line without its newline was cut while it was appended (power lost, disk full): not an id.
            # Its batch was never checkpointed, so it is read again; cut off the rest, or the next id appended
            # would be merged with it and lost.
            whole = data[:data.rfind(b"\n") + 1]
            if record and len(whole) < len(data):
                os.truncate(log, len(whole))
            logged = [line for line in whole.decode().splitlines() if line]
            self.seen.update(logged)
            # The log holds as many ids as the checkpoint counts sent, but after a crash between the two: those
            # past the count are the ids of the batch read again now, sent already (by this job: counted so).
            self.unsaved.update(logged[self.report.sent:])
            self.report.sent += len(self.unsaved)
        elif record:
            log.unlink(missing_ok=True)
        self._log = log if record else None

    def record_sent(self) -> None:
        """After the broker acknowledged a batch, before its checkpoint: the batch's event ids to the log."""
        if self._log is not None and self._batch_ids:
            self._log.parent.mkdir(parents=True, exist_ok=True)
            with self._log.open("a") as fh:
                fh.write("".join(f"{event_id}\n" for event_id in self._batch_ids))
                fh.flush()
                os.fsync(fh.fileno())
        self._batch_ids.clear()

    def finish(self) -> None:
        if self._log is not None:
            self._log.unlink(missing_ok=True)

    def module_of(self, topic: str) -> str:
        """The module whose topic `topic` is."""
        return next(m for m in MODULES if self.settings.kafka.topic_for(m) == topic)

    def prepare(self, event: DecodedEvent, module: str, where: str = "") -> tuple[str, bytes, bytes] | None:
        """The REPLAY record of `event` read from `module`'s topic (or archive directory), or None when the
        selection leaves it out, it was sent already, or it does not fit that topic: the pipeline dead-lettered
        it (`records.misfit`), and its copy would be another dead letter at every replay, or, another module's
        event, be published to that module's topic and applied there."""
        reason = misfit(event, module.upper())
        if reason is not None:
            self.report.undecodable += 1
            log.warning("%s: does not fit its topic, not replayed (the pipeline dead-lettered it): %s", where, reason)
            return None
        if event.module.lower() not in self.selection.modules or not self.selection.matches(event):
            self.report.filtered += 1
            return None
        if event.event_id in self.seen:
            if event.event_id in self.unsaved:  # this job sent it, its checkpoint did not record it: not again
                self.unsaved.discard(event.event_id)
            else:
                self.report.duplicates += 1
            return None
        self.seen.add(event.event_id)
        if self._log is not None:
            self._batch_ids.append(event.event_id)
        replayed = event.to_event()
        replayed["source"] = REPLAY
        topic = self.settings.kafka.topic_for(event.module.lower())
        # Keyed by its object, as the receivers key it, whatever key it was read with: the worker dead-letters an
        # event keyed otherwise (`records.misfit_key`), and its copy, applied now, lands in its object's partition.
        key = ObjectKey(event.country_code, event.party_id, event.object_id).kafka_key()
        return topic, key, encode_event(replayed)


def _checkpoint(settings: Settings, job: str) -> Checkpoint:
    return Checkpoint(jobs_dir(settings, "replay") / f"{job}.json")


def _sent_log(settings: Settings, job: str) -> Path:
    return jobs_dir(settings, "replay") / f"{job}.sent"


def _running_alone(settings: Settings, job: str, dry_run: bool) -> contextlib.AbstractContextManager[None]:
    """One run of a job at a time: a second one would resume the same checkpoint and send every event again.
    A dry run writes nothing and needs no lock."""
    if dry_run:
        return contextlib.nullcontext()
    return running_alone(jobs_dir(settings, "replay") / f"{job}.lock", f"replay job {job}")


def _existing(checkpoint: Checkpoint, spec: dict[str, Any], job: str, again: bool) -> dict[str, Any] | None:
    """The state to resume, None to plan afresh; raises when a named job's selection changed."""
    state = checkpoint.load()
    if state is None:
        return None
    if state.get("spec") != spec:
        raise JobError(f"job {job} was started with another selection ({state.get('spec')}); "
                       "pick another --job name or remove " + str(checkpoint.path))
    if state.get("status") == "done" and again:
        return None
    return state


# --- from Kafka ----------------------------------------------------------------------------------------------


def _open_job(settings: Settings, spec: dict[str, Any], job: str | None,
              again: bool) -> tuple[str, Checkpoint, dict[str, Any] | None, ReplayReport]:
    """A replay job's name, checkpoint and saved state; the report says "already-done" for a finished one."""
    name = job or job_id("replay", spec)
    checkpoint = _checkpoint(settings, name)
    state = _existing(checkpoint, spec, name, again)
    report = ReplayReport(job=name, status="done")
    if state is not None and state.get("status") == "done":
        report.status = "already-done"
        _restore(report, state)
    return name, checkpoint, state, report


async def plan_kafka(settings: Settings, bootstrap: str, selection: Selection, *, resumed: bool = False,
                     truncated: list[str] | None = None) -> list[tuple[str, PartitionRange]]:
    """(module, offset range) per partition for `selection`, against the topics as they are now. A `--partition`
    no selected topic has is an error, but for a resumed job (`resumed`): its topics recreated with fewer.

    `truncated` gets the partitions whose range starts at their oldest record held because the selection reaches
    before it: retention deleted the records there (the first offset held is not 0), which the replay cannot send.
    """
    planned: list[tuple[str, PartitionRange]] = []
    counts: dict[str, int] = {}
    for module in selection.modules:
        held = await partitions_of(bootstrap, settings.kafka.topic_for(module))
        counts[settings.kafka.topic_for(module)] = len(held)
        tps = [tp for tp in held if selection.partition is None or tp.partition == selection.partition]
        bounds = await offset_bounds(settings.kafka, bootstrap, tps, exact=True)  # a stop short would be "done"
        starts = {tp: max(b, selection.from_offset or 0) for tp, (b, _e) in bounds.items()}
        stops = {tp: min(e, selection.to_offset if selection.to_offset is not None else e)
                 for tp, (_b, e) in bounds.items()}
        if selection.since is not None:  # a record's timestamp is never before its received_at
            at = await offsets_at(settings.kafka, bootstrap, selection.since, bounds)
            starts = {tp: max(starts[tp], at[tp]) for tp in bounds}
        if truncated is not None:  # the selection starts at the oldest record held (or none is): maybe earlier
            truncated.extend(f"{tp.topic}/{tp.partition} (from offset {b})" for tp, (b, _e) in bounds.items()
                             if b > 0 and starts[tp] == b and (selection.from_offset or 0) < b)
        # No stop from `until`: a replayed copy's timestamp is when it was replayed, any time after its
        # received_at (history restored from an archive is in the topics only so); the filter decides.
        for tp in tps:
            planned.append((module, PartitionRange(tp.topic, tp.partition, starts[tp], max(starts[tp], stops[tp]))))
    if selection.partition is not None and not planned and not resumed:  # a typo would pass for an empty replay
        raise JobError(f"--partition {selection.partition}: no selected topic has it ("
                       + ", ".join(f"{topic}: partitions 0-{n - 1}" for topic, n in counts.items()) + ")")
    return planned


async def _plan_recreated(settings: Settings, bootstrap: str, selection: Selection, state: dict[str, Any], name: str,
                          report: ReplayReport) -> None:
    """Plan again the unfinished ranges of partitions that were recreated since the job was planned.

    A partition never ends before an end it had, unless its topic was deleted and created again (the embedded
    broker's topics live in memory: they come back empty on every start of `dev`). Its records left to replay
    are gone, and reading on from the checkpoint's position would never get to the planned stop (the job failed
    with "run the same command again", every time). One recreated and filled up to that stop again holds other
    records there: the last record the job read (`last`, a digest of its bytes) is compared, as `export`
    does. Such a partition's range is planned afresh from the partition as it is now; the ids logged as sent
    keep every event this job sent from going twice.
    """
    unfinished = [r for r in state["ranges"] if r["next"] < r["stop"]]
    if not unfinished:
        return
    topics = sorted({r["topic"] for r in unfinished})
    now = {(tp.topic, tp.partition): tp for tp in await partitions_of(bootstrap, *topics)}
    held = [now[(r["topic"], r["partition"])] for r in unfinished if (r["topic"], r["partition"]) in now]
    bounds = await offset_bounds(settings.kafka, bootstrap, held, exact=True)
    recreated = []
    for r in unfinished:
        tp = now.get((r["topic"], r["partition"]))
        if tp is None or bounds[tp][1] < r["stop"]:
            recreated.append(r)
        elif r.get("last") and bounds[tp][0] < r["next"]:  # the last record read is still held: the same one?
            found = await _first_record_at(bootstrap, tp, r["next"] - 1)
            if found is None or found[0] != r["next"] - 1 or _digest(found[1]) != r["last"]:
                recreated.append(r)
    if not recreated:
        return
    where = ", ".join(f"{r['topic']}/{r['partition']}" for r in recreated[:3])
    if not _sent_log(settings, name).exists() and report.sent:
        raise JobError(f"the topics of job {name} were recreated since it was planned ({where}) and its log of "
                       "the event ids it sent is missing; rerun with a new --job name to replay everything")
    log.warning("%s of job %s were recreated since it was planned (a restart of the embedded broker?): its records "
                "left are gone; planning again from the partitions as they are now", where, name)
    modules = tuple(m for m in MODULES if any(r["module"] == m for r in recreated))
    planned = {(r.topic, r.partition): (m, r)
               for m, r in await plan_kafka(settings, bootstrap, dataclasses.replace(selection, modules=modules),
                                            resumed=True)}
    for r in recreated:
        _m, fresh = planned.pop((r["topic"], r["partition"]), (None, None))
        if fresh is None:  # the partition is gone: nothing left to read there
            r["next"] = r["stop"]
        else:
            r.update(start=fresh.start, stop=fresh.stop, next=fresh.start, last=None)
    known = {(r["topic"], r["partition"]) for r in state["ranges"]}
    state["ranges"].extend({**fresh.as_json(), "module": m, "next": fresh.start}  # a topic recreated with more
                           for key, (m, fresh) in planned.items()  # partitions: its new ones are planned too
                           if key not in known and key[0] in {r["topic"] for r in recreated})


def _digest(value: bytes | None) -> str:
    return hashlib.sha256(value or b"").hexdigest()[:32]


def _decode(value: bytes, report: ReplayReport, where: str) -> DecodedEvent | None:
    try:
        return decode_event(value)
    except AvroCodecError as exc:
        report.undecodable += 1
        log.warning("%s: not an OcpiEvent, not replayed (the pipeline dead-lettered it): %s", where, exc)
        return None


async def replay_kafka(settings: Settings, bootstrap: str, selection: Selection, *, job: str | None = None,
                       again: bool = False, dry_run: bool = False, progress: JobProgress | None = None,
                       on_batch: Callable[[ReplayReport], None] | None = None, batch: int = BATCH) -> ReplayReport:
    """Replay records of the module topics (see the module docstring). `on_batch` runs after every
    checkpointed batch of at most `batch` records (progress hooks, tests)."""
    spec = {"source": "kafka", **selection.spec()}
    with _running_alone(settings, job or job_id("replay", spec), dry_run):
        return await _replay_kafka(settings, bootstrap, selection, spec, job=job, again=again, dry_run=dry_run,
                                   progress=progress, on_batch=on_batch, batch=batch)


async def _replay_kafka(settings: Settings, bootstrap: str, selection: Selection, spec: dict[str, Any], *,
                        job: str | None, again: bool, dry_run: bool, progress: JobProgress | None,
                        on_batch: Callable[[ReplayReport], None] | None, batch: int) -> ReplayReport:
    progress = progress or NoProgress()
    name, checkpoint, state, report = _open_job(settings, spec, job, again)
    if report.status == "already-done":
        return report
    if state is None:
        truncated: list[str] = []
        planned = await plan_kafka(settings, bootstrap, selection, truncated=truncated)
        state = {"job": name, "kind": "replay", "spec": spec, "status": "running", "started_at": iso(_now()),
                 "resolved": selection.resolved(), "truncated": truncated,
                 "ranges": [{**r.as_json(), "module": m, "next": r.start} for m, r in planned]}
    else:
        report.status = "resumed-done"
        selection = selection.as_planned(state)
        _restore(report, state)
        await _plan_recreated(settings, bootstrap, selection, state, name, report)
    ranges = state["ranges"]
    report.truncated = list(state.get("truncated", []))
    report.lines = [PlanLine(r["module"], f"{r['topic']}/{r['partition']} offsets {r['start']}-{r['stop'] - 1}"
                             if r["stop"] > r["start"] else f"{r['topic']}/{r['partition']} (no offsets)",
                             r["stop"] - r["start"], partition=(r["topic"], r["partition"])) for r in ranges]
    remaining = {(r["topic"], r["partition"]): r for r in ranges if r["next"] < r["stop"]}
    todo = [PartitionRange(r["topic"], r["partition"], r["next"], r["stop"]) for r in remaining.values()]
    run = _Run(settings, selection, report)
    run.attach(_sent_log(settings, name), resume=report.status == "resumed-done", record=not dry_run)
    if dry_run:
        report.status = "dry-run"
        return await _dry_run_kafka(bootstrap, todo, run, progress)
    checkpoint.save(state)
    progress.start(f"replay {name}", sum(r.span for r in todo))
    expected = {r.tp: r.start for r in todo}  # the next offset: one skipped may have been deleted meanwhile
    async with JobProducer(settings.kafka, bootstrap) as producer, \
            contextlib.aclosing(read_ranges(bootstrap, todo, batch=batch, stall_is_error=True)) as batches:
        async for rng, records in batches:
            await _skipped(bootstrap, rng, expected, records[0].offset, report)
            expected[rng.tp] = records[-1].offset + 1
            prepared_batch = []
            for record in records:
                event = _decode(record.value, report, f"{rng.topic}/{rng.partition}@{record.offset}")
                where = f"{rng.topic}/{rng.partition}@{record.offset}"
                module = remaining[(rng.topic, rng.partition)]["module"]
                prepared = run.prepare(event, module, where) if event is not None else None
                if prepared is not None:
                    prepared_batch.append(prepared)

            async def step(sending: list[tuple[str, bytes, bytes]] = prepared_batch, rng: PartitionRange = rng,
                           last: int = records[-1].offset, tail: bytes | None = records[-1].value) -> None:
                report.sent += await producer.send_all(sending)
                _save_written(state, report, producer, checkpoint)
                run.record_sent()
                remaining[(rng.topic, rng.partition)].update(next=last + 1, last=_digest(tail))
                _save_stats(state, report)
                checkpoint.save(state)

            await uninterrupted(step())
            progress.advance(len(records))
            if on_batch is not None:
                on_batch(report)
    for rng in todo:
        await _skipped(bootstrap, rng, expected, rng.stop, report)
    for r in ranges:
        r["next"] = r["stop"]
    state["status"] = "done"
    state["finished_at"] = iso(_now())
    _save_stats(state, report)
    checkpoint.save(state)
    run.finish()
    return report


async def _dry_run_kafka(bootstrap: str, todo: list[PartitionRange], run: _Run,
                         progress: JobProgress) -> ReplayReport:
    report = run.report
    matching: dict[tuple[str, int], int] = {}
    progress.start("counting", sum(r.span for r in todo))
    reading = read_ranges(bootstrap, todo, batch=BATCH, stall_is_error=True)
    expected = {r.tp: r.start for r in todo}
    async with contextlib.aclosing(reading) as batches:
        async for rng, records in batches:
            await _skipped(bootstrap, rng, expected, records[0].offset, report)
            expected[rng.tp] = records[-1].offset + 1
            for record in records:
                event = _decode(record.value, report, f"{rng.topic}/{rng.partition}@{record.offset}")
                module = run.module_of(rng.topic)
                if event is not None and run.prepare(event, module) is not None:
                    matching[(rng.topic, rng.partition)] = matching.get((rng.topic, rng.partition), 0) + 1
            progress.advance(len(records))
    for rng in todo:
        await _skipped(bootstrap, rng, expected, rng.stop, report)
    for line in report.lines:
        line.matching = matching.get(line.partition, 0) if line.partition else 0
    return report


async def _skipped(bootstrap: str, rng: PartitionRange, expected: dict[TopicPartition, int], upto: int,
                   report: ReplayReport) -> None:
    """Offsets from the next one expected in `rng`'s partition up to `upto` that the reading went past without a
    record: those retention deleted meanwhile (a long job, one resumed days later) are named in the report, not
    passed over as if replayed."""
    if upto > expected[rng.tp]:
        lost = await deleted_below(bootstrap, rng, expected[rng.tp], upto)
        if lost:
            report.lost.append(lost)
            log.warning("%s was deleted by Kafka's retention before the replay read it: not replayed", lost)
        expected[rng.tp] = upto


# --- from archive files --------------------------------------------------------------------------------------


async def replay_archive(settings: Settings, bootstrap: str, root: Path, selection: Selection, *,
                         job: str | None = None, again: bool = False, dry_run: bool = False,
                         progress: JobProgress | None = None,
                         on_batch: Callable[[ReplayReport], None] | None = None) -> ReplayReport:
    """Replay the events of archive files written by `export` (any schema revision; see archive.py)."""
    if selection.by_offset:
        raise JobError("--partition/--from-offset/--to-offset select Kafka offsets; they do not apply to an archive")
    root = root.resolve()
    spec = {"source": "archive", "archive": str(root), **selection.spec()}
    with _running_alone(settings, job or job_id("replay", spec), dry_run):
        return await _replay_archive(settings, bootstrap, root, selection, spec, job=job, again=again,
                                     dry_run=dry_run, progress=progress, on_batch=on_batch)


async def _replay_archive(settings: Settings, bootstrap: str, root: Path, selection: Selection, spec: dict[str, Any],
                          *, job: str | None, again: bool, dry_run: bool, progress: JobProgress | None,
                          on_batch: Callable[[ReplayReport], None] | None) -> ReplayReport:
    progress = progress or NoProgress()
    name, checkpoint, state, report = _open_job(settings, spec, job, again)
    if report.status == "already-done":
        return report
    if state is None:
        files = _plan_archive(root, selection, [])
        if not files and not archive_files(root, selection.modules):  # a wrong path would pass for an empty archive
            raise JobError(f"{root} holds no archive files of {', '.join(selection.modules)} (an archive "
                           "`export` wrote: <module>/<YYYY-MM-DD>/part-*.avro); check the directory")
        state = {"job": name, "kind": "replay", "spec": spec, "status": "running", "started_at": iso(_now()),
                 "resolved": selection.resolved(), "files": files}
    else:
        report.status = "resumed-done"
        selection = selection.as_planned(state)
        _restore(report, state)
        gone = [e["path"] for e in state["files"] if e["next"] < e["records"] and not (root / e["path"]).is_file()]
        if gone:
            # The archive changed under the interrupted job (files of an earlier export replaced): plan again
            # from the files there now. Files are never rewritten under their name, so positions in the ones
            # still there hold, and the ids logged as sent keep every event this job sent from going twice.
            if not _sent_log(settings, name).exists() and report.sent:
                raise JobError(f"archive files of job {name} are gone ({', '.join(gone[:3])}) and its log of the "
                               f"event ids it sent is missing; rerun with a new --job name to replay everything")
            log.warning("archive files of job %s are gone (%s); planning again from the files in %s", name,
                        ", ".join(gone[:3]), root)
            state["files"] = _plan_archive(root, selection, state["files"])
    entries = state["files"]
    report.lines = [PlanLine(e["module"], e["path"], e["records"]) for e in entries]
    todo = [e for e in entries if e["next"] < e["records"]]
    run = _Run(settings, selection, report)
    run.attach(_sent_log(settings, name), resume=report.status == "resumed-done", record=not dry_run)
    progress.start("counting" if dry_run else f"replay {name}", sum(e["records"] - e["next"] for e in todo))
    if dry_run:
        report.status = "dry-run"
        for entry, line in zip(entries, report.lines, strict=True):
            line.matching = 0
            if entry in todo:
                for _n, event in _archive_events(root, entry, report):
                    line.matching += event is not None and run.prepare(event, entry["module"]) is not None
                progress.advance(entry["records"] - entry["next"])
        return report
    checkpoint.save(state)
    async with JobProducer(settings.kafka, bootstrap) as producer:
        for entry in todo:
            batch: list[tuple[str, bytes, bytes]] = []
            for consumed, event in _archive_events(root, entry, report):
                prepared = run.prepare(event, entry["module"], where=entry["path"]) if event is not None else None
                if prepared is not None:
                    batch.append(prepared)
                if consumed % BATCH == 0:
                    await _flush_archive_batch(run, producer, batch, entry, consumed, state, checkpoint, report,
                                               progress, on_batch)
                    batch = []
            await _flush_archive_batch(run, producer, batch, entry, entry["records"], state, checkpoint, report,
                                       progress, on_batch)
    state["status"] = "done"
    state["finished_at"] = iso(_now())
    _save_stats(state, report)
    checkpoint.save(state)
    run.finish()
    return report


def _plan_archive(root: Path, selection: Selection, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per archive file the selection picks, keeping the position of files `earlier` planned."""
    positions = {e["path"]: e for e in earlier}
    files = []
    for f in archive_files(root, selection.modules, since=selection.since, until=selection.until):
        path = str(f.relative_to(root))
        files.append(positions.get(path) or {"path": path, "module": f.relative_to(root).parts[0],
                                             "records": count_records(f), "next": 0})
    return files


def _archive_events(root: Path, entry: dict[str, Any],
                    report: ReplayReport) -> Iterator[tuple[int, DecodedEvent | None]]:
    """(records consumed so far in the file, event) from the entry's position on."""
    consumed = entry["next"]
    for record in read_archive_file(root / entry["path"], skip=entry["next"]):
        consumed += 1
        try:
            yield consumed, event_of(record)
        except AvroCodecError as exc:
            report.undecodable += 1
            log.warning("%s record %d cannot be encoded as a current OcpiEvent: %s", entry["path"], consumed, exc)
            yield consumed, None


async def _flush_archive_batch(run: _Run, producer: JobProducer, batch: list[tuple[str, bytes, bytes]],
                               entry: dict[str, Any],
                               consumed: int, state: dict[str, Any], checkpoint: Checkpoint, report: ReplayReport,
                               progress: JobProgress, on_batch: Callable[[ReplayReport], None] | None) -> None:
    if consumed <= entry["next"]:
        return
    done = entry["next"]

    async def step() -> None:
        report.sent += await producer.send_all(batch)
        _save_written(state, report, producer, checkpoint)
        run.record_sent()
        entry["next"] = consumed
        _save_stats(state, report)
        checkpoint.save(state)

    await uninterrupted(step())
    progress.advance(consumed - done)
    if on_batch is not None:
        on_batch(report)
    await asyncio.sleep(0)  # reading the file does not suspend: let a Ctrl-C in here


# --- shared ---------------------------------------------------------------------------------------------------


async def wait_for_replayed(settings: Settings, bootstrap: str, written: dict[TopicPartition, int], *,
                            timeout: float) -> None:
    """Wait until the pipeline's worker has consumed what a replay job wrote (`replay --wait`).

    A job's offsets outlive its topics: one resumed, or run again once done, after they were recreated (the
    embedded broker's, on every start of `dev`) holds offsets past their new ends, which the worker's group
    never commits (the wait lasted the whole timeout and failed). A partition's end now bounds what is waited
    for there (exact: an end short of it would end the wait early), and a partition gone is not waited for.
    """
    tps = [tp for tp in await topic_partitions(bootstrap, sorted({tp.topic for tp in written})) if tp in written]
    bounds = await offset_bounds(settings.kafka, bootstrap, tps, exact=True)
    targets = {tp: min(offset, bounds[tp][1]) for tp, offset in written.items() if tp in bounds}
    await wait_for_group(bootstrap, settings.pipeline.app_id, targets, timeout=timeout)


def _now() -> datetime:
    return datetime.now(UTC)


def _merge_written(report: ReplayReport, producer: JobProducer) -> None:
    for tp, offset in producer.written.items():
        report.written[tp] = max(report.written.get(tp, 0), offset)


def _save_written(state: dict[str, Any], report: ReplayReport, producer: JobProducer,
                  checkpoint: Checkpoint) -> None:
    """After the broker acknowledged a batch, before its ids are logged as sent: the offsets it was written at to
    the checkpoint. A crash after logging them leaves a rerun that sends the batch no more, and `--wait` must
    still wait for it."""
    before = dict(report.written)
    _merge_written(report, producer)
    if report.written != before:
        state["written"] = _written_json(report)
        checkpoint.save(state)


def _written_json(report: ReplayReport) -> list[list[Any]]:
    return [[tp.topic, tp.partition, offset] for tp, offset in sorted(report.written.items())]


def _save_stats(state: dict[str, Any], report: ReplayReport) -> None:
    state["stats"] = {"sent": report.sent, "filtered": report.filtered, "duplicates": report.duplicates,
                      "undecodable": report.undecodable}
    state["lost"] = list(report.lost)
    state["written"] = _written_json(report)
    state["updated_at"] = iso(_now())


def _restore(report: ReplayReport, state: dict[str, Any]) -> None:
    """Counts of the earlier runs of a resumed job, so the report covers the whole job."""
    stats = state.get("stats", {})
    report.sent = int(stats.get("sent", 0))
    report.filtered = int(stats.get("filtered", 0))
    report.duplicates = int(stats.get("duplicates", 0))
    report.undecodable = int(stats.get("undecodable", 0))
    report.lost = list(state.get("lost", []))
    report.written = {TopicPartition(t, p): int(o) for t, p, o in state.get("written", [])}
