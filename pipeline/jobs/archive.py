"""Archive raw events to Avro container files, and read them back (`export`, `replay --from-archive`).

Layout: `<dir>/<module>/<YYYY-MM-DD>/part-*.avro`, the day being the UTC day of the events' `received_at`.
Every file is an Avro object container (fastavro `writer`) of `ocpi.pipeline.OcpiEvent` records with the
writer schema in its header, compressed with zstandard (`container_codec`: fastavro's, from this version's
dependencies), deflate where that is missing. Because the schema travels with the data, a later version reads
today's files by resolving the file's schema to its own current one (Avro schema resolution, `infra/codec.py`
evolution rules); it does not need today's schema in its registry. The other way round, a file of a later
version is refused (`JobError`, to be replayed with that version) when its records have fields this version's
schema lacks, which resolution would silently leave out, or values it cannot resolve.

Sources (choose with `--source`):
- `kafka` (default; Kafka is the source of truth for raw events): the records of the module topics, exactly
  as they are on the wire, replays included. One file is a run of consecutive offsets of one partition within
  one day: `part-<topic>-<partition>-e<epoch>-<first offset>-<last offset>.avro`. A rerun continues after the
  last archived offset of each partition, so nothing is archived twice. Before continuing, the record at that
  offset is compared with the archived one: if it differs (or the partition is now shorter), the topic was
  recreated (the embedded broker keeps topics in memory only) and its offsets start over in a new epoch. A
  Kafka that does not deliver that record (not answering for a while) is an error, not a recreated topic; so is
  one that stops delivering before a partition's end (the export is not complete there: run it again).
- `clickhouse`: `raw_events` (one row per event id), for history the topics no longer hold. Routing headers
  (OCPI-from/to-*) are not stored there and come back empty; everything else, event id and content hash
  included, is kept. Files per module and day, `part-clickhouse-g<generation>-<n>.avro`, a generation per
  run. A rerun compares event ids: a day whose files hold every event id ClickHouse has for it is skipped,
  otherwise only the missing events are written, as a new generation beside the old files. Archived files are
  never deleted: `raw_events` loses a day's rows to its TTL over time (a day shrinks), so ClickHouse holding
  fewer events than the archive is normal, and an archive must keep what ClickHouse no longer has.

Files are written under a temporary name (`.part-…tmp`, which no reader picks up) and renamed when complete,
so an interrupted export leaves only whole files; leftovers are removed by the next run. One export into a
directory runs at a time (`.export.lock`; a second one is refused). Use one source per
archive directory: both together would archive the same events twice (harmless for a replay, which sends
each event id once, but twice the space).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any, Final

import fastavro
from aiokafka.structs import TopicPartition
from clickhouse_connect.driver.client import Client
from fastavro.read import SchemaResolutionError
from fastavro.write import Writer

from infra.codec import (
    EVENT_SCHEMA,
    AvroCodecError,
    DecodedEvent,
    decode_event,
    decode_record,
    encode_event,
    encode_record,
    schema_root,
)
from infra.settings import Settings
from ocpi import model
from ocpi.canonical import to_builtins
from ocpi.compat import RECHECK
from ocpi.decode import OcpiJsonError, OcpiValidationError, decode
from pipeline.jobs.common import MODULES, JobError, JobProgress, NoProgress, running_alone
from pipeline.jobs.kafka_io import PartitionRange, deleted_below, offset_bounds, partitions_of, read_ranges

log = logging.getLogger(__name__)

PART_GLOB = "part-*.avro"
# The widths are the names' least (`{n:04d}` ...): a 10,000th chunk or a 1,000th epoch has one digit more.
_KAFKA_PART = re.compile(r"^part-(?P<topic>.+)-(?P<partition>\d{4,})-e(?P<epoch>\d{3,})-(?P<first>\d{12,})-"
                         r"(?P<last>\d{12,})\.avro$")
_CH_PART = re.compile(r"^part-clickhouse-g(?P<generation>\d+)-(?P<chunk>\d{4,})\.avro$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_NUMBER = re.compile(r"([0-9]+)")


def _written_order(path: Path) -> tuple[tuple[int, int | str], ...]:
    """A part file's place in its day: its name with every number compared as a number, so the order they were
    written in (chunks, epochs, offsets) past the names' least widths (a 10,000th chunk, a 1,000th epoch)."""
    return tuple((1, int(part)) if i % 2 else (0, part) for i, part in enumerate(_NUMBER.split(path.name)))


@functools.cache
def current_schema() -> tuple[int, dict[str, Any]]:
    """(revision, parsed schema) of the newest `ocpi.pipeline.OcpiEvent` in the codec's registry."""
    root = schema_root()
    found = []
    for entry in root.iterdir():
        match = _VERSION_DIR.match(entry.name)
        if match and (entry / f"{EVENT_SCHEMA}.avsc").is_file():
            found.append((int(match[1]), entry / f"{EVENT_SCHEMA}.avsc"))
    if not found:
        raise JobError(f"no {EVENT_SCHEMA} schema under {root}")
    version, path = max(found, key=lambda item: item[0])
    parsed = fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")), named_schemas={})
    if not isinstance(parsed, dict):
        raise JobError(f"{path} is not a record schema")
    return version, parsed


@functools.cache
def container_codec() -> str:
    """The Avro container codec archives are written with: zstandard where fastavro reads and writes it, else
    deflate (always there). Only codecs this version's own dependencies provide: fastavro takes zstandard from
    `backports.zstd` (a dependency of ours, before Python 3.14) or 3.14's `compression.zstd`. Snappy needs
    `cramjam`, which is none of them: taken wherever it happened to be installed, it made archives that the
    same version installed elsewhere could not read."""
    buffer = io.BytesIO()
    try:
        fastavro.writer(buffer, "int", [1], codec="zstandard")
        readable = list(fastavro.reader(io.BytesIO(buffer.getvalue()))) == [1]
    except Exception as exc:  # fastavro's missing-codec errors have no common type
        log.info("archives are written with deflate: zstandard is not available here (%s)", exc)
        readable = False
    return "zstandard" if readable else "deflate"


def day_of(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


# --- writing ------------------------------------------------------------------------------------------------


class _PartFile:
    """One container file being written under a temporary name; `commit` renames it into place."""

    def __init__(self, directory: Path, stem: str, metadata: dict[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.temp = directory / f".{stem}.tmp"
        self._fh: IO[bytes] = self.temp.open("wb")
        _version, schema = current_schema()
        self._writer = Writer(self._fh, schema, codec=container_codec(), metadata=metadata)
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(record)
        self.count += 1

    def commit(self, name: str) -> Path:
        self._writer.flush()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        final = self.directory / name
        self.temp.replace(final)
        return final

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.temp.unlink(missing_ok=True)


def _remove_temp_files(root: Path) -> None:
    """Leftovers of an interrupted export (never picked up by readers: they do not match `part-*.avro`)."""
    for temp in root.glob("*/*/.part-*.tmp"):
        temp.unlink(missing_ok=True)


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)  # module -> records archived in this run
    undecodable: int = 0
    skipped_days: int = 0
    new_epochs: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # offset ranges retention removed before they were archived

    @property
    def total(self) -> int:
        return sum(self.records.values())


def _kafka_parts(root: Path, module: str) -> dict[tuple[str, int], list[tuple[int, int, int, Path]]]:
    """Archived Kafka part files per (topic, partition): (epoch, first, last, path)."""
    found: dict[tuple[str, int], list[tuple[int, int, int, Path]]] = {}
    for path in (root / module).glob(f"*/{PART_GLOB}"):
        match = _KAFKA_PART.match(path.name)
        if match:
            key = (match["topic"], int(match["partition"]))
            found.setdefault(key, []).append((int(match["epoch"]), int(match["first"]), int(match["last"]), path))
    return found


def _last_event_id(path: Path) -> str | None:
    last = None
    for record in read_archive_file(path):
        last = record
    return str(last["event_id"]) if last else None


async def _first_record_at(bootstrap: str, tp: TopicPartition, offset: int) -> tuple[int, bytes] | None:
    """The first record at or after `offset` (None: Kafka holds none there). A broker that delivers nothing
    for a while is a JobError, not None: the partition would be taken for recreated and archived again."""
    wanted = PartitionRange(tp.topic, tp.partition, offset, offset + 1)
    async with contextlib.aclosing(read_ranges(bootstrap, [wanted], batch=1, idle_timeout=5.0,
                                               stall_is_error=True)) as batches:
        async for _r, records in batches:
            return records[0].offset, records[0].value
    return None


def _exporting(root: Path) -> contextlib.AbstractContextManager[None]:
    """One export into a directory at a time: a second one would take the first's temporary files for an
    interrupted run's leftovers and delete them, and write its own under the same names."""
    root.mkdir(parents=True, exist_ok=True)
    return running_alone(root / ".export.lock", f"an export into {root}")


async def export_from_kafka(settings: Settings, bootstrap: str, root: Path, modules: Sequence[str], *,
                            max_records: int = 50_000, progress: JobProgress | None = None) -> ExportResult:
    """Archive every module-topic record not archived yet (see the module docstring)."""
    with _exporting(root):
        return await _export_from_kafka(settings, bootstrap, root, modules, max_records=max_records,
                                        progress=progress)


async def _export_from_kafka(settings: Settings, bootstrap: str, root: Path, modules: Sequence[str], *,
                             max_records: int, progress: JobProgress | None) -> ExportResult:
    progress = progress or NoProgress()
    result = ExportResult()
    _remove_temp_files(root)
    plans: list[tuple[str, PartitionRange, int]] = []
    for module in modules:
        topic = settings.kafka.topic_for(module)
        tps = await partitions_of(bootstrap, topic)
        bounds = await offset_bounds(settings.kafka, bootstrap, tps, exact=True)
        archived = _kafka_parts(root, module)
        for tp in tps:
            begin, end = bounds[tp]
            parts = archived.get((tp.topic, tp.partition), [])
            epoch, start = 0, begin
            if parts:
                epoch, _first, last, path = max(parts)
                start = last + 1
                if last >= begin:  # the last archived record is still in Kafka: is it the same record?
                    found = await _first_record_at(bootstrap, tp, last) if last < end else None
                    same = found is not None and found[0] == last and _event_id(found[1]) == _last_event_id(path)
                    if not same:
                        epoch, start = epoch + 1, begin
                        result.new_epochs.append(f"{tp.topic}/{tp.partition}")
                        log.warning("%s/%s was recreated since the last export (offset %d differs); "
                                    "archiving it again from %d as epoch %d", tp.topic, tp.partition, last,
                                    begin, epoch)
            if start < begin:
                result.lost.append(f"{tp.topic}/{tp.partition} offsets {start}-{begin - 1}")
                start = begin
            plans.append((module, PartitionRange(tp.topic, tp.partition, start, end), epoch))
    progress.start("export from Kafka", sum(r.span for _m, r, _e in plans))
    for module in modules:
        result.records.setdefault(module, 0)
    for module, rng, epoch in plans:
        if rng.span:
            await _export_range(bootstrap, root, module, rng, epoch, max_records, result, progress)
    return result


def _event_id(value: bytes) -> str | None:
    try:
        return str(decode_record(value, EVENT_SCHEMA)["event_id"])
    except AvroCodecError:
        return None


async def _export_range(bootstrap: str, root: Path, module: str, rng: PartitionRange, epoch: int,
                        max_records: int, result: ExportResult, progress: JobProgress) -> None:
    part: _PartFile | None = None
    day: date | None = None
    first = last = -1
    expected = rng.start  # the next offset: one skipped below the log start was deleted by retention meanwhile

    def finish() -> None:
        nonlocal part
        if part is not None:
            name = f"part-{rng.topic}-{rng.partition:04d}-e{epoch:03d}-{first:012d}-{last:012d}.avro"
            result.files.append(part.commit(name))
            result.records[module] += part.count
            part = None

    try:
        # A stall is an error: ended there, the export would pass for complete ("nothing new in Kafka").
        async with contextlib.aclosing(read_ranges(bootstrap, [rng], stall_is_error=True)) as batches:
            async for _r, records in batches:
                for record in records:
                    if record.offset > expected:
                        await _deleted_meanwhile(bootstrap, rng, expected, record.offset, result)
                    expected = record.offset + 1
                    try:
                        # The worker's reader first: fastavro reads some spec breaches (a long of more than 64
                        # bits, wrapped) that the worker dead-letters; written again, they would pass for valid.
                        decode_event(record.value)
                        datum = decode_record(record.value, EVENT_SCHEMA)
                    except AvroCodecError as exc:
                        result.undecodable += 1
                        log.warning("%s/%s offset %d is not an OcpiEvent, not archived: %s", rng.topic, rng.partition,
                                    record.offset, exc)
                        continue
                    record_day = day_of(datum["received_at"])
                    if part is not None and (record_day != day or part.count >= max_records):
                        finish()
                    if part is None:
                        day, first = record_day, record.offset
                        part = _PartFile(root / module / record_day.isoformat(),
                                         f"part-{rng.topic}-{rng.partition:04d}-{first:012d}",
                                         {"ocpi.source": "kafka", "ocpi.topic": rng.topic,
                                          "ocpi.partition": str(rng.partition), "ocpi.first_offset": str(first)})
                    part.write(datum)
                    last = record.offset
                progress.advance(len(records))
        if expected < rng.stop:
            await _deleted_meanwhile(bootstrap, rng, expected, rng.stop, result)
        finish()
    finally:
        if part is not None:  # interrupted: the run of records in it is archived by the next export
            part.discard()


async def _deleted_meanwhile(bootstrap: str, rng: PartitionRange, start: int, stop: int,
                             result: ExportResult) -> None:
    """Offsets [start, stop) of `rng` the reading went past without a record, deleted by retention after the
    export planned: lost to the archive for good, a rerun goes on after them, so named as lost like the ones
    deleted before it started."""
    lost = await deleted_below(bootstrap, rng, start, stop)
    if lost:
        result.lost.append(lost)



# --- export from ClickHouse raw_events ------------------------------------------------------------------------

RAW_COLUMNS = ("event_id", "partner_id", "module", "operation", "level", "country_code", "party_id", "object_id",
               "evse_uid", "connector_id", "received_at", "request_id", "correlation_id", "source",
               "content_hash", "relaxations", "payload_json")
_FULL_TYPES = {"LOCATION": "Location", "EVSE": "EVSE", "CONNECTOR": "Connector", "SESSION": "Session",
               "CDR": "CDR"}


def payload_type_of(operation: str, level: str) -> str:
    """The payload union branch of an event: the level's object, or its Patch class for a PATCH (and an UNLIST,
    whose LocationPatch holds its list's date_to)."""
    full = _FULL_TYPES[level]
    return f"{full}Patch" if operation in ("PATCH", "UNLIST") else full


def record_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """A raw_events row as an OcpiEvent container record (routing headers are not stored there: null).

    Raises AvroCodecError, OcpiJsonError or OcpiValidationError for a row that cannot be an event any more.
    """
    values = dict(zip(RAW_COLUMNS, row, strict=True))
    payload_type = payload_type_of(values["operation"], values["level"])
    # What the receiver accepted unchanged under its partner's profile (an errata length, `#NA`, the epoch) is
    # stored as it came: accepted again, as for a stored object re-checked after a merge (`pipeline.wire`).
    decoded = decode(values.pop("payload_json"), getattr(model, payload_type), profile=RECHECK)
    event = {**values, "relaxations": list(values["relaxations"]), "from_country_code": None,
             "from_party_id": None, "to_country_code": None, "to_party_id": None,
             "payload": (payload_type, to_builtins(decoded.value))}
    return decode_record(encode_event(event), EVENT_SCHEMA)


def _ch_generations(day_dir: Path) -> dict[str, list[Path]]:
    generations: dict[str, list[Path]] = {}
    for path in sorted(day_dir.glob("part-clickhouse-g*.avro")):
        match = _CH_PART.match(path.name)
        if match:
            generations.setdefault(match["generation"], []).append(path)
    return generations


def export_from_clickhouse(settings: Settings, client: Client, root: Path, modules: Sequence[str], *,
                           max_records: int = 50_000, progress: JobProgress | None = None) -> ExportResult:
    """Archive `raw_events` per module and day (see the module docstring); days fully archived are skipped."""
    with _exporting(root):
        return _export_from_clickhouse(settings, client, root, modules, max_records=max_records, progress=progress)


def _export_from_clickhouse(settings: Settings, client: Client, root: Path, modules: Sequence[str], *,
                            max_records: int, progress: JobProgress | None) -> ExportResult:
    progress = progress or NoProgress()
    result = ExportResult()
    _remove_temp_files(root)
    days: list[tuple[str, date, int]] = []
    # Client-side parameters (%(name)s), bound by clickhouse-connect before the query is sent.
    for module in modules:
        result.records[module] = 0
        rows = client.query("SELECT toDate(received_at) AS day, count() FROM raw_events FINAL "
                            "WHERE module = %(m)s GROUP BY day ORDER BY day",
                            parameters={"m": module.upper()}).result_rows
        days.extend((module, day, int(n)) for day, n in rows)
    progress.start("export from ClickHouse", sum(n for _m, _d, n in days))
    generation = str(time.time_ns())
    for module, day, expected in days:
        day_dir = root / module / day.isoformat()
        archived = _archived_ids([p for paths in _ch_generations(day_dir).values() for p in paths])
        missing: set[str] | None = None  # None: the whole day
        if archived:
            # By event id, not by count: the TTL shrinks a day while late events may grow it.
            missing = _day_ids(client, module, day) - archived
            if not missing:
                result.skipped_days += 1
                progress.advance(expected)
                continue
        result.files.extend(_export_day(client, module, day, day_dir, generation, max_records, result, progress,
                                        only=missing))
    return result


# Reads only the event id of an archived record (Avro schema resolution skips the other fields).
_EVENT_ID_ONLY: Final = fastavro.parse_schema({"type": "record", "name": "OcpiEvent", "namespace": "ocpi.pipeline",
                                               "fields": [{"name": "event_id", "type": "string"}]})


def _archived_ids(paths: Sequence[Path]) -> set[str]:
    """The event ids in archive files (every other field is skipped, not decoded)."""
    ids: set[str] = set()
    for path in paths:
        with path.open("rb") as fh, _reading(path):
            ids.update(str(record["event_id"]) for record in fastavro.reader(fh, reader_schema=_EVENT_ID_ONLY)
                       if isinstance(record, dict))
    return ids


def _day_ids(client: Client, module: str, day: date) -> set[str]:
    rows = client.query("SELECT event_id FROM raw_events FINAL WHERE module = %(m)s "
                        "AND toDate(received_at) = toDate(%(day)s)",
                        parameters={"m": module.upper(), "day": day.isoformat()}).result_rows
    return {str(event_id) for (event_id,) in rows}


def _export_day(client: Client, module: str, day: date, day_dir: Path, generation: str, max_records: int,
                result: ExportResult, progress: JobProgress, *, only: set[str] | None = None) -> list[Path]:
    """Write the day's events (those in `only`, if given) as files of generation `generation`."""
    written: list[Path] = []
    after: tuple[str, str] | None = None
    chunk = 0
    while True:
        keyset = ("AND (received_at, event_id) > (parseDateTime64BestEffort(%(at)s, 6, 'UTC'), %(id)s) "
                  if after else "")
        rows = client.query(
            f"SELECT {', '.join(RAW_COLUMNS)} FROM raw_events FINAL WHERE module = %(m)s "
            f"AND toDate(received_at) = toDate(%(day)s) {keyset}"
            f"ORDER BY received_at, event_id LIMIT {int(max_records)}",
            parameters={"m": module.upper(), "day": day.isoformat(),
                        **({"at": after[0], "id": after[1]} if after else {})}).result_rows
        if not rows:
            return written
        wanted = rows if only is None else [row for row in rows if str(row[0]) in only]
        if wanted:
            part = _PartFile(day_dir, f"part-clickhouse-g{generation}-{chunk:04d}",
                             {"ocpi.source": "clickhouse", "ocpi.module": module, "ocpi.day": day.isoformat()})
            try:
                for row in wanted:
                    try:
                        part.write(record_from_row(row))
                    except (AvroCodecError, OcpiJsonError, OcpiValidationError) as exc:
                        result.undecodable += 1
                        log.warning("raw event %s cannot be rebuilt as an OcpiEvent, not archived: %s", row[0], exc)
                if part.count:
                    written.append(part.commit(f"part-clickhouse-g{generation}-{chunk:04d}.avro"))
                    chunk += 1
                else:
                    part.discard()
            except BaseException:
                part.discard()
                raise
            result.records[module] += part.count
        progress.advance(len(rows))
        last_at: datetime = rows[-1][RAW_COLUMNS.index("received_at")]
        after = (last_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"), str(rows[-1][0]))


# --- reading --------------------------------------------------------------------------------------------------


def archive_files(root: Path, modules: Sequence[str] = MODULES, *, since: datetime | None = None,
                  until: datetime | None = None) -> list[Path]:
    """The complete archive files of `modules`, in module, day and written order; days outside
    [since, until) are left out (records are filtered exactly by the reader's caller)."""
    if not root.is_dir():
        raise JobError(f"{root} is not a directory")
    files = []
    for module in modules:
        for day_dir in sorted(p for p in (root / module).glob("*") if p.is_dir()):
            try:
                day = date.fromisoformat(day_dir.name)
            except ValueError:
                continue
            if since is not None and day < day_of(since):
                continue
            if until is not None and day > day_of(until):
                continue
            files.extend(sorted(day_dir.glob(PART_GLOB), key=_written_order))
    return files


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """What fastavro raises on a damaged file (truncated, overwritten, not Avro) as a JobError naming it, not a
    traceback: nothing of it was sent, and the job can be run again once the file is restored or moved away."""
    try:
        yield
    except SchemaResolutionError as exc:  # intact, but of a later version: a copy of it would fail alike
        raise _newer_archive(path, str(exc)) from exc
    except ValueError as exc:
        if not _MISSING_CODEC.search(str(exc)):
            raise JobError(_unreadable(path, exc)) from exc
        # Intact, compressed with a codec this installation lacks (snappy, written by an earlier version where
        # cramjam was installed): a copy of it would fail alike.
        raise JobError(f"{path} is compressed with a codec this installation cannot read ({exc}); the file is "
                       "not damaged: install that library and run the command again") from exc
    except JobError:
        raise
    except Exception as exc:  # fastavro's, and its codecs' (zlib, zstandard, snappy), errors have no common base
        raise JobError(_unreadable(path, exc)) from exc


# fastavro's words for a codec it knows but whose library is missing, or one it does not know at all.
_MISSING_CODEC: Final = re.compile(r"codec is supported but you need to install|^Unrecognized codec")


def _unreadable(path: Path, exc: Exception) -> str:
    return (f"{path} is not a readable archive file ({type(exc).__name__}: {exc}); restore it from a copy, or move "
            "it out of the archive, and run the command again")


def read_archive_file(path: Path, *, skip: int = 0) -> Iterator[dict[str, Any]]:
    """The records of one archive file resolved to the current OcpiEvent schema, after the first `skip`.

    Union values with several records come as (record name, value) tuples, as `infra.codec.encode_record`
    takes them.
    """
    _version, schema = current_schema()
    with path.open("rb") as fh, _reading(path):
        reader = fastavro.reader(fh, reader_schema=schema, return_record_name=True,
                                 return_record_name_override=True)
        unknown = fields_left_out(reader.writer_schema, schema)
        if unknown:
            # Of a later revision (fields are only ever added): resolved to ours, its records would lose them.
            raise _newer_archive(path, f"fields it does not have: {', '.join(unknown)}")
        for index, record in enumerate(reader):
            if index >= skip and isinstance(record, dict):
                yield record


def _newer_archive(path: Path, why: str) -> JobError:
    return JobError(f"{path} was written with a schema this version cannot read ({why}): an archive of a newer "
                    "version; replay it with that version, or move it out of the archive, and run the command again")


def fields_left_out(writer: Any, reader: Any) -> list[str]:
    """`Record.field` of every field of a record of the (parsed) `writer` schema that the record of that name in
    `reader` lacks: Avro resolution reads the writer's value and leaves it out of the record without a word."""
    ours = _record_fields(reader, {}, aliases=True)
    return [f"{name}.{field_name}" for name, fields in _record_fields(writer, {}, aliases=False).items()
            if name in ours for field_name in fields if field_name not in ours[name]]


def _record_fields(schema: Any, found: dict[str, list[str]], *, aliases: bool) -> dict[str, list[str]]:
    """Full name → field names (and their aliases, if asked) of every record defined in a parsed schema."""
    if isinstance(schema, list):
        for branch in schema:
            _record_fields(branch, found, aliases=aliases)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record" and schema["name"] not in found:
            fields = schema["fields"]
            found[schema["name"]] = [n for f in fields for n in (f["name"], *(f.get("aliases", ()) if aliases else ()))]
            for f in fields:
                _record_fields(f["type"], found, aliases=aliases)
        elif kind == "array":
            _record_fields(schema["items"], found, aliases=aliases)
        elif kind == "map":
            _record_fields(schema["values"], found, aliases=aliases)
        elif isinstance(kind, dict | list):
            _record_fields(kind, found, aliases=aliases)
    return found


def count_records(path: Path) -> int:
    """Records in a container file, from its block headers (decompresses, decodes nothing)."""
    with path.open("rb") as fh, _reading(path):
        return sum(block.num_records for block in fastavro.block_reader(fh))


def event_of(record: dict[str, Any]) -> DecodedEvent:
    """An archive record as the event the pipeline would decode from Kafka."""
    return decode_event(encode_record(EVENT_SCHEMA, record))
