"""Archive files: ClickHouse export (idempotent, generations), reading back with the current schema, archives
written by an earlier schema revision, and resuming an archive replay whose files changed."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import msgspec
import pytest
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.codec import (
    EVENT_SCHEMA,
    AvroCodecError,
    DecodedEvent,
    decode_event,
    decode_record,
    encode_event,
    encode_record,
)
from infra.events import build_event
from infra.settings import Settings
from ocpi.canonical import to_ocpi_json
from ocpi.compat import CompatProfile
from ocpi.decode import Decoded, decode
from ocpi.identity import ObjectKey
from ocpi.model import Location, Session, SessionPatch
from pipeline.jobs.archive import (
    RAW_COLUMNS,
    _PartFile,
    archive_files,
    container_codec,
    count_records,
    event_of,
    export_from_clickhouse,
    export_from_kafka,
    read_archive_file,
    record_from_row,
)
from pipeline.jobs.common import JobError, parse_time
from pipeline.jobs.kafka_io import PartitionRange, offset_bounds, read_ranges, topic_partitions
from pipeline.jobs.replay import Selection, replay_archive, replay_kafka
from tests.conftest import EXAMPLES, unique
from tests.unit.avro.convert import current_schema

FIXTURES = Path(__file__).parent / "fixtures"
# Recent days: raw_events keeps 30 days (a TTL), older rows would vanish under the test.
DAY1 = (datetime.now(UTC) - timedelta(days=3)).replace(hour=8, minute=30, second=0, microsecond=123456)
DAY2 = (datetime.now(UTC) - timedelta(days=2)).replace(hour=23, minute=59, second=59, microsecond=999999)


def example(name: str, **changes: Any) -> bytes:
    return json.dumps({**json.loads((EXAMPLES / name).read_text()), **changes}).encode()


def make_event(body: bytes, model: Any, payload_type: str, *, module: str, level: str, operation: str,
               received_at: datetime, key: ObjectKey | None = None, relaxations: tuple[str, ...] = (),
               routed: bool = False) -> DecodedEvent:
    decoded = decode(body, model)
    event = build_event(partner_id="cpo-be", module=module, operation=operation, level=level,
                        key=key or ObjectKey.of(decoded.value), decoded=Decoded(decoded.value, relaxations),
                        payload_type=payload_type, source="PUSH", request_id=f"req-{received_at.timestamp()}",
                        correlation_id="corr", received_at=received_at,
                        from_party=("BE", "BEC") if routed else None, to_party=("NL", "OPP") if routed else None)
    return decode_event(encode_event(event))


def row(event: DecodedEvent, offset: int) -> list[Any]:
    values = {name: getattr(event, name) for name in RAW_COLUMNS if name != "payload_json"}
    values["payload_json"] = to_ocpi_json(event.payload).decode()  # what the pipeline stores: OCPI JSON
    return [*(values[name] for name in RAW_COLUMNS), "topic", 0, offset]


@pytest.fixture
def store(chdb_dsn: str) -> Iterator[tuple[Client, str]]:
    client = connect(chdb_dsn)
    database = unique("archive")
    migrate(client, database)
    client.database = database
    yield client, database
    client.command(f"DROP DATABASE IF EXISTS `{database}`")
    client.close()


def insert(client: Client, events: list[DecodedEvent]) -> None:
    client.insert("raw_events", [row(e, i) for i, e in enumerate(events)],
                  column_names=[*RAW_COLUMNS, "kafka_topic", "kafka_partition", "kafka_offset"])


def insert_sessions(client: Client, count: int) -> None:
    """`count` Session PUT events (S0, S1, ...) received a minute apart on DAY1, in the store's raw_events."""
    insert(client, [make_event(example("session_example_2_short_finished.json", id=f"S{i}"), Session, "Session",
                               module="sessions", level="SESSION", operation="PUT",
                               received_at=DAY1.replace(minute=i)) for i in range(count)])


async def sessions_in_topic(client: Client, settings: Settings, tmp_path: Path, broker: str, count: int) -> None:
    """`count` Session PUT events in the sessions topic, by way of an archive of the store (`tmp_path / "ch"`)."""
    insert_sessions(client, count)
    export_from_clickhouse(settings, client, tmp_path / "ch", ("sessions",))
    await replay_archive(settings, broker, tmp_path / "ch", Selection(modules=("sessions",)))


def test_clickhouse_export_round_trips_events_and_reruns_idempotently(store: tuple[Client, str],
                                                                     settings_for: Any, tmp_path: Path) -> None:
    client, _database = store
    first = make_event(example("session_example_2_short_finished.json"), Session, "Session", module="sessions",
                       level="SESSION", operation="PUT", received_at=DAY1,
                       relaxations=("DATETIME_OFFSET:$.last_updated",), routed=True)
    patch = make_event(example("session_patch_example_total_cost.json"), SessionPatch, "SessionPatch",
                       module="sessions", level="SESSION", operation="PATCH", received_at=DAY2,
                       key=ObjectKey("BE", "BEC", "101"))
    location = make_event(example("location_example.json"), Location, "Location", module="locations",
                          level="LOCATION", operation="PUT", received_at=DAY1)
    insert(client, [first, patch, location])
    root = tmp_path / "archive"
    settings = settings_for()

    result = export_from_clickhouse(settings, client, root, ("locations", "sessions", "cdrs"), max_records=10)
    assert result.records == {"locations": 1, "sessions": 2, "cdrs": 0} and result.undecodable == 0
    files = archive_files(root)
    assert [f.relative_to(root).parent.as_posix() for f in files] == [
        f"locations/{DAY1.date()}", f"sessions/{DAY1.date()}", f"sessions/{DAY2.date()}"]
    assert all(f.name.startswith("part-clickhouse-g") and f.name.endswith("-0000.avro") for f in files)
    with files[1].open("rb") as fh:
        assert fastavro.reader(fh).codec == container_codec()

    back = [event_of(record) for f in files for record in read_archive_file(f)]
    unrouted = msgspec.structs.replace(first, from_country_code=None, from_party_id=None, to_country_code=None,
                                   to_party_id=None)  # raw_events does not keep routing headers
    assert back == [location, unrouted, patch]

    again = export_from_clickhouse(settings, client, root, ("locations", "sessions", "cdrs"))
    assert again.skipped_days == 3 and again.files == [] and archive_files(root) == files

    (files[1].parent / ".part-clickhouse-g1-0000.tmp").write_bytes(b"left by a crash")
    later = make_event(example("session_example_2_short_finished.json", id="102"), Session, "Session",
                       module="sessions", level="SESSION", operation="PUT", received_at=DAY1.replace(hour=9))
    insert(client, [later])
    third = export_from_clickhouse(settings, client, root, ("sessions",), max_records=1)
    assert third.skipped_days == 1 and third.records == {"sessions": 1}  # only the event not archived yet
    day1 = sorted((root / "sessions" / DAY1.date().isoformat()).iterdir())
    assert len(day1) == 2 and files[1] in day1  # a new generation beside the previous one, which stays
    assert sorted(event_of(r).object_id for p in day1 for r in read_archive_file(p)) == ["101", "102"]
    assert sum(count_records(p) for p in day1) == 2


def test_clickhouse_export_never_drops_archived_events_when_a_day_shrinks(store: tuple[Client, str],
                                                                         settings_for: Any, tmp_path: Path) -> None:
    client, _database = store
    events = [make_event(example("session_example_2_short_finished.json", id=f"S{i}"), Session, "Session",
                         module="sessions", level="SESSION", operation="PUT", received_at=DAY1.replace(hour=8 + i))
              for i in range(3)]
    insert(client, events)
    root = tmp_path / "archive"
    settings = settings_for()

    def archived() -> list[str]:
        return sorted(event_of(r).object_id for f in archive_files(root) for r in read_archive_file(f))

    export_from_clickhouse(settings, client, root, ("sessions",))
    files = archive_files(root)
    assert archived() == ["S0", "S1", "S2"]
    # raw_events' TTL removes the day's earliest rows first: ClickHouse now holds fewer events than the archive.
    client.command("ALTER TABLE raw_events DELETE WHERE object_id = 'S0' SETTINGS mutations_sync = 1")
    shrunk = export_from_clickhouse(settings, client, root, ("sessions",))
    assert shrunk.skipped_days == 1 and shrunk.files == [] and archive_files(root) == files
    assert archived() == ["S0", "S1", "S2"]
    # Shrunk by one and grown by one (a late event of that day): the same count, but one event is new.
    late = make_event(example("session_example_2_short_finished.json", id="S3"), Session, "Session",
                      module="sessions", level="SESSION", operation="PUT", received_at=DAY1.replace(hour=20))
    insert(client, [late])
    grown = export_from_clickhouse(settings, client, root, ("sessions",))
    assert grown.records == {"sessions": 1} and len(grown.files) == 1
    assert set(files) < set(archive_files(root))
    assert archived() == ["S0", "S1", "S2", "S3"]


def test_an_archive_of_an_earlier_schema_revision_is_read_with_the_current_one(tmp_path: Path) -> None:
    previous = fastavro.parse_schema(json.loads((FIXTURES / "ocpi_event_previous.avsc").read_text()),
                                     named_schemas={})
    current = make_event(example("session_example_2_short_finished.json"), Session, "Session", module="sessions",
                         level="SESSION", operation="PUT", received_at=DAY1)
    record = decode_record(encode_event(current.to_event()), EVENT_SCHEMA)
    for gone in ("from_country_code", "from_party_id", "to_country_code", "to_party_id", "relaxations"):
        del record[gone]
    record["source"] = "PULL"
    day = tmp_path / "sessions" / "2024-05-01"
    day.mkdir(parents=True)
    with (day / "part-old.avro").open("wb") as fh:
        fastavro.writer(fh, previous, [record, {**record, "event_id": "second"}], codec="deflate")

    files = archive_files(tmp_path, ("sessions",))
    assert files == [day / "part-old.avro"] and count_records(files[0]) == 2
    events = [event_of(r) for r in read_archive_file(files[0])]
    assert events[0] == msgspec.structs.replace(current, source="PULL")  # the new fields take their defaults
    assert events[1].event_id == "second" and events[1].payload == current.payload
    assert [event_of(r).event_id for r in read_archive_file(files[0], skip=1)] == ["second"]


def newer_archive_refused(tmp_path: Path, newer: dict[str, Any], record: dict[str, Any]) -> JobError:
    """Write `record` with the `newer` schema into an archive day and read it: the JobError it is refused with."""
    day = tmp_path / "sessions" / "2024-05-01"
    day.mkdir(parents=True)
    with (day / "part-new.avro").open("wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(newer, named_schemas={}), [record])
    with pytest.raises(JobError, match="written with a schema this version cannot read") as raised:
        list(read_archive_file(day / "part-new.avro"))
    return raised.value


def test_an_archive_of_a_newer_revision_that_cannot_be_resolved_is_named_so_not_taken_for_damaged(
        tmp_path: Path) -> None:
    """A file written by a later version whose record this version cannot resolve (a Source symbol it does not know)
    was reported as damaged ("not a readable archive file ... restore it from a copy"): the file is fine, and a
    copy of it fails alike. It is named as written with a schema this version cannot read, to replay with a
    version that can."""
    newer = current_schema()  # the current revision, with what a later one adds
    source = next(f for f in newer["fields"] if f["name"] == "source")
    source["type"]["symbols"].append("SYNC")
    current = make_event(example("session_example_2_short_finished.json"), Session, "Session", module="sessions",
                         level="SESSION", operation="PUT", received_at=DAY1)
    record = {**decode_record(encode_event(current.to_event()), EVENT_SCHEMA), "source": "SYNC"}
    raised = newer_archive_refused(tmp_path, newer, record)
    assert "SYNC" in str(raised) and "restore it from a copy" not in str(raised)


def test_an_archive_of_a_newer_revision_with_fields_this_version_lacks_is_not_read_without_them(
        tmp_path: Path) -> None:
    """A later revision adds fields (with defaults, as the evolution rules say), which Avro resolution to this
    version's schema silently leaves out: a replay of such an archive with this version sent its events without
    them (a `replay --rebuild` storing the objects without them). The file is named as written with a schema this
    version cannot read in full, to replay with a version that can."""
    newer = current_schema()  # the current revision, with what a later one adds
    newer["fields"].insert(-1, {"name": "tenant", "type": ["null", "string"], "default": None})
    payload = next(f for f in newer["fields"] if f["name"] == "payload")
    session = next(b for b in payload["type"] if isinstance(b, dict) and b["name"] == "Session")
    session["fields"].append({"name": "grid_operator", "type": ["null", "string"], "default": None})
    current = make_event(example("session_example_2_short_finished.json"), Session, "Session", module="sessions",
                         level="SESSION", operation="PUT", received_at=DAY1)
    record = decode_record(encode_event(current.to_event()), EVENT_SCHEMA)
    branch, body = record["payload"]
    record = {**record, "tenant": "T1", "payload": (branch, {**body, "grid_operator": "NL-GRID"})}
    raised = newer_archive_refused(tmp_path, newer, record)
    assert "tenant" in str(raised) and "grid_operator" in str(raised)


@pytest.mark.parametrize(("relaxation", "changes"), [
    ("ERRATA_MAX_LENGTH", {"address": "Avenue " + "x" * 60}),
    ("NA_IN_ANY_REQUIRED_STRING", {"city": "#NA"}),
])
def test_a_raw_event_accepted_as_it_was_under_a_relaxation_is_archived(relaxation: str,
                                                                      changes: dict[str, Any]) -> None:
    # The receiver accepted the value unchanged under the partner's profile, so raw_events stores it as it is:
    # read back for the archive it must pass again (as a stored object re-checked after a merge does).
    decoded = decode(example("location_example.json", **changes), Location,
                     profile=CompatProfile.from_names(relaxation))
    assert [r.partition(":")[0] for r in decoded.relaxations] == [relaxation]
    pushed = decode_event(encode_event(build_event(
        partner_id="cpo-be", module="locations", operation="PUT", level="LOCATION", key=ObjectKey.of(decoded.value),
        decoded=decoded, payload_type="Location", source="PUSH", request_id="req", correlation_id="corr",
        received_at=DAY1)))
    record = record_from_row(row(pushed, 0)[:len(RAW_COLUMNS)])
    assert event_of(record) == pushed


def test_an_unlist_in_raw_events_is_archived_as_it_was_sent() -> None:
    """An UNLIST (full sync, schema v2) is stored with its LocationPatch of `last_updated` only: exported from
    ClickHouse it must come back as that event, not be refused as a Location without its fields."""
    from infra.events import unlist_event

    pushed = decode_event(encode_event(unlist_event(partner_id="cpo-be", key=ObjectKey("BE", "BEC", "LOC1"),
                                                    listed_until=DAY1.replace(microsecond=123400),
                                                    correlation_id="corr", received_at=DAY1)))
    record = record_from_row(row(pushed, 0)[:len(RAW_COLUMNS)])
    assert event_of(record) == pushed and pushed.operation == "UNLIST"


def test_archive_files_are_ordered_and_filtered_by_day(tmp_path: Path) -> None:
    for module, day, name in (("cdrs", "2024-05-02", "part-b.avro"), ("cdrs", "2024-05-01", "part-z.avro"),
                              ("cdrs", "2024-05-01", "part-a.avro"), ("sessions", "2024-05-03", "part-a.avro"),
                              ("cdrs", "2024-05-01", ".part-x.tmp"), ("cdrs", "not-a-day", "part-q.avro")):
        (tmp_path / module / day).mkdir(parents=True, exist_ok=True)
        (tmp_path / module / day / name).write_bytes(b"")
    names = [p.relative_to(tmp_path).as_posix() for p in archive_files(tmp_path)]
    assert names == ["sessions/2024-05-03/part-a.avro", "cdrs/2024-05-01/part-a.avro", "cdrs/2024-05-01/part-z.avro",
                     "cdrs/2024-05-02/part-b.avro"]
    since, until = datetime(2024, 5, 2, 12, tzinfo=UTC), datetime(2024, 5, 2, 13, tzinfo=UTC)
    assert [p.name for p in archive_files(tmp_path, ("cdrs",), since=since, until=until)] == ["part-b.avro"]


class _Stop(Exception):
    pass


async def test_an_interrupted_archive_replay_resumes_after_its_files_were_replaced(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str) -> None:
    client, _database = store
    events = [make_event(example("session_example_2_short_finished.json", id=f"S{i}"), Session, "Session",
                         module="sessions", level="SESSION", operation="PUT", received_at=DAY1.replace(minute=i))
              for i in range(3)]
    insert(client, events[:2])
    root = tmp_path / "archive"
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    export_from_clickhouse(settings, client, root, ("sessions",), max_records=1)
    _first, second = archive_files(root)

    def interrupt(_report: Any) -> None:
        raise _Stop

    selection = Selection(modules=("sessions",))
    with pytest.raises(_Stop):  # after the first file's batch was acknowledged and checkpointed
        await replay_archive(settings, broker, root, selection, on_batch=interrupt)
    # An export of an earlier version replaced a day's files by a new generation (here: renamed), and a later
    # one added a late event.
    second.rename(second.with_name("part-clickhouse-g9-0000.avro"))
    insert(client, events[2:])
    export_from_clickhouse(settings, client, root, ("sessions",))
    report = await replay_archive(settings, broker, root, selection)
    assert report.status == "resumed-done" and report.sent == 3
    tps = await topic_partitions(broker, [settings.kafka.topic_sessions])
    bounds = await offset_bounds(settings.kafka, broker, tps)
    sent = [decode_event(r.value) for _r, records in
            [batch async for batch in read_ranges(broker, [PartitionRange(tp.topic, tp.partition, b, e)
                                                           for tp, (b, e) in bounds.items()])] for r in records]
    assert sorted(e.object_id for e in sent) == ["S0", "S1", "S2"]  # each once
    assert {e.source for e in sent} == {"REPLAY"}


async def test_an_archive_replay_since_a_duration_resumes_when_run_again(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str) -> None:
    client, _database = store
    recent = datetime.now(UTC) - timedelta(hours=1)
    insert(client, [make_event(example("session_example_2_short_finished.json", id=f"R{i}"), Session, "Session",
                               module="sessions", level="SESSION", operation="PUT",
                               received_at=recent + timedelta(minutes=i)) for i in range(2)])
    root = tmp_path / "archive"
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    export_from_clickhouse(settings, client, root, ("sessions",), max_records=1)

    def selection() -> Selection:  # what `replay --from-archive … --module sessions --since 3h` builds
        return Selection(modules=("sessions",), since=parse_time("3h"), relative=("3h", None))

    def interrupt(_report: Any) -> None:
        raise _Stop

    first = selection()
    with pytest.raises(_Stop):
        await replay_archive(settings, broker, root, first, on_batch=interrupt)
    report = await replay_archive(settings, broker, root, selection())  # a moment later: `3h` moved
    assert report.status == "resumed-done" and report.sent == 2
    again = await replay_archive(settings, broker, root, selection())
    assert again.status == "already-done"


async def test_a_time_range_replay_finds_events_the_topics_hold_only_as_replayed_copies(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str) -> None:
    """History restored from an archive (the embedded broker restarted, or Kafka's retention passed) is in the
    topics only as REPLAY copies: their record timestamps are the restore's, their `received_at` the original
    one. A replay by `received_at` range must still find them."""
    client, _database = store
    events = [make_event(example("session_example_2_short_finished.json", id=f"S{i}"), Session, "Session",
                         module="sessions", level="SESSION", operation="PUT", received_at=DAY1.replace(minute=i))
              for i in range(3)]
    insert(client, events)
    root = tmp_path / "archive"
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    export_from_clickhouse(settings, client, root, ("sessions",))
    restored = await replay_archive(settings, broker, root, Selection(modules=("sessions",)))
    assert restored.sent == 3

    window = Selection(modules=("sessions",), since=DAY1 - timedelta(hours=1), until=DAY1 + timedelta(hours=1))
    plan = await replay_kafka(settings, broker, window, dry_run=True)
    assert sum(line.matching or 0 for line in plan.lines) == 3
    report = await replay_kafka(settings, broker, window)
    assert report.sent == 3 and report.status == "done"


def test_a_damaged_archive_file_is_a_job_error_naming_it(tmp_path: Path) -> None:
    event = make_event(example("session_example_2_short_finished.json"), Session, "Session", module="sessions",
                       level="SESSION", operation="PUT", received_at=DAY1)
    record = decode_record(encode_event(event.to_event()), EVENT_SCHEMA)
    day = tmp_path / "sessions" / "2024-05-01"
    part = _PartFile(day, "part-whole", {})  # as export writes them
    for _ in range(50):
        part.write(record)
    whole = part.commit("part-whole.avro")
    data = whole.read_bytes()
    whole.unlink()
    damaged = {"part-truncated.avro": data[: len(data) - 40], "part-not-avro.avro": b"PK\x03\x04 a zip file",
               "part-overwritten.avro": data[:200] + b"\x00" * 64 + data[264:]}
    for name, content in damaged.items():
        (day / name).write_bytes(content)
        with pytest.raises(JobError, match=name):
            count_records(day / name)
            list(read_archive_file(day / name))
        with pytest.raises(JobError, match=name):
            list(read_archive_file(day / name))
        (day / name).unlink()


async def test_a_second_export_into_the_same_archive_while_one_runs_is_refused(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str) -> None:
    """Two exports into one directory at once: the second deleted the first's temporary file as a leftover,
    and wrote its own under the same name, which the first then renamed into place as its own (a half-written
    file, or one holding more records than its name says), or the first failed with a traceback."""
    client, _database = store
    insert_sessions(client, 6)
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    export_from_clickhouse(settings, client, tmp_path / "from-clickhouse", ("sessions",))
    await replay_archive(settings, broker, tmp_path / "from-clickhouse", Selection(modules=("sessions",)))

    root = tmp_path / "archive"
    first, second = await asyncio.gather(
        export_from_kafka(settings, broker, root, ("sessions",), max_records=2),
        export_from_kafka(settings, broker, root, ("sessions",), max_records=2), return_exceptions=True)

    refused = [r for r in (first, second) if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], JobError) and "running already" in str(refused[0])
    archived = [str(r["object_id"]) for f in archive_files(root) for r in read_archive_file(f)]
    assert sorted(archived) == [f"S{i}" for i in range(6)]


async def test_a_second_run_of_a_replay_job_while_it_runs_is_refused(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str) -> None:
    """The same replay command twice at once (a second terminal): the second resumed the first's checkpoint, and
    both sent every event, although within one job each event id is sent once."""
    client, _database = store
    insert_sessions(client, 4)
    root = tmp_path / "archive"
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    export_from_clickhouse(settings, client, root, ("sessions",), max_records=1)

    selection = Selection(modules=("sessions",))
    first, second = await asyncio.gather(replay_archive(settings, broker, root, selection),
                                         replay_archive(settings, broker, root, selection), return_exceptions=True)

    refused = [r for r in (first, second) if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], JobError) and "running already" in str(refused[0])
    tps = await topic_partitions(broker, [settings.kafka.topic_sessions])
    bounds = await offset_bounds(settings.kafka, broker, tps)
    assert sum(end - begin for begin, end in bounds.values()) == 4  # each event once
    assert (await replay_archive(settings, broker, root, selection)).status == "already-done"


async def test_a_replay_or_export_of_a_topic_that_does_not_exist_is_an_error_not_nothing_to_do(
        settings_for: Any, tmp_path: Path, broker: str) -> None:
    """A wrong OCPI_TOPIC_* or bootstrap: `replay` printed "sent 0 events" and `export` "nothing new in Kafka",
    exit 0, as if there were nothing to do."""
    settings = settings_for()  # its topics were never created
    with pytest.raises(JobError, match=rf"topic {settings.kafka.topic_cdrs} does not exist"):
        await replay_kafka(settings, broker, Selection(modules=("cdrs",)))
    with pytest.raises(JobError, match=rf"topic {settings.kafka.topic_cdrs} does not exist"):
        await replay_kafka(settings, broker, Selection(modules=("cdrs",)), dry_run=True)
    with pytest.raises(JobError, match=rf"topic {settings.kafka.topic_sessions} does not exist"):
        await export_from_kafka(settings, broker, tmp_path / "archive", ("sessions",))


async def test_a_broker_slow_to_answer_the_export_is_not_taken_for_a_recreated_topic(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun compares the last archived record with the one Kafka holds at its offset. When Kafka did not
    deliver it in time (a broker that stopped answering for a moment: aiokafka logs its fetch errors and returns
    nothing), the partition was taken for recreated and archived again from its start, as a new epoch: every
    event twice in the archive, the files of both epochs listed."""
    import aiokafka

    from pipeline.jobs import archive as archive_mod
    from pipeline.jobs import kafka_io

    client, _database = store
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    await sessions_in_topic(client, settings, tmp_path, broker, 4)
    root = tmp_path / "archive"
    await export_from_kafka(settings, broker, root, ("sessions",), max_records=2)
    assert sorted(str(r["object_id"]) for f in archive_files(root) for r in read_archive_file(f)) == \
        [f"S{i}" for i in range(4)]

    fetch = aiokafka.AIOKafkaConsumer.getmany
    answers_again = asyncio.get_running_loop().time() + 1.5

    async def hiccup(self: Any, *tps: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if asyncio.get_running_loop().time() < answers_again:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        return await fetch(self, *tps, timeout_ms=timeout_ms, max_records=max_records)

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", hiccup)
    read = kafka_io.read_ranges
    monkeypatch.setattr(archive_mod, "read_ranges", lambda *a, **kw: read(*a, **{**kw, "idle_timeout": 1.0}))
    with contextlib.suppress(JobError):  # "run it again" is fine; archiving everything again is not
        await export_from_kafka(settings, broker, root, ("sessions",), max_records=2)
    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", fetch)
    result = await export_from_kafka(settings, broker, root, ("sessions",), max_records=2)

    assert result.new_epochs == []
    assert sorted(str(r["object_id"]) for f in archive_files(root) for r in read_archive_file(f)) == \
        [f"S{i}" for i in range(4)]  # each once


async def test_a_broker_that_stops_answering_fails_the_export_instead_of_finishing_it(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kafka that stopped delivering records below the end of a partition (aiokafka logs its fetch errors and
    returns nothing) ended the export there, with success: "nothing new in Kafka", or the files up to there as
    if that were all, before a broker restart (the embedded one loses its topics) or retention took the rest."""
    import aiokafka

    from pipeline.jobs import archive as archive_mod
    from pipeline.jobs import kafka_io

    client, _database = store
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    await sessions_in_topic(client, settings, tmp_path, broker, 4)
    fetch = aiokafka.AIOKafkaConsumer.getmany

    async def stalled(self: Any, *tps: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", stalled)
    read = kafka_io.read_ranges
    monkeypatch.setattr(archive_mod, "read_ranges", lambda *a, **kw: read(*a, **{**kw, "idle_timeout": 1.0}))
    root = tmp_path / "archive"
    with pytest.raises(JobError, match="run the same command again"):
        await export_from_kafka(settings, broker, root, ("sessions",))

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", fetch)  # the broker answers again
    result = await export_from_kafka(settings, broker, root, ("sessions",))
    assert result.records == {"sessions": 4}


def test_a_day_exported_in_more_than_9999_files_is_not_exported_again(store: tuple[Client, str],
                                                                      settings_for: Any, tmp_path: Path) -> None:
    """Chunks are numbered `{n:04d}`, so a day written in more than 10,000 files (`--max-records` small, a busy
    day) has files `part-clickhouse-g<gen>-10000.avro` on: a rerun did not count them as archived (the name did
    not match the 4-digit pattern) and wrote their events again, every rerun, into files replay reads too."""
    client, _database = store
    insert_sessions(client, 2)
    root = tmp_path / "archive"
    settings = settings_for()
    export_from_clickhouse(settings, client, root, ("sessions",), max_records=1)
    _first, second = archive_files(root)
    # What the 10,001st file of a generation is called (10,001 files are too many for a unit test to write).
    second.rename(second.with_name(second.name.replace("-0001.avro", "-10000.avro")))

    again = export_from_clickhouse(settings, client, root, ("sessions",), max_records=1)

    assert again.skipped_days == 1 and again.files == []
    assert sorted(str(r["object_id"]) for f in archive_files(root) for r in read_archive_file(f)) == ["S0", "S1"]


async def test_records_retention_deletes_while_the_export_reads_are_named_as_lost(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records Kafka's retention deleted after the export planned its ranges and before it read them (an export
    catching up at the retention boundary) were skipped without a word: the consumer goes on from the oldest record
    still held, the export ended as complete (exit 0) and a rerun goes on after them, so they were lost to the
    archive unnamed. They are named as lost, as those deleted before the export started are."""
    import aiokafka

    from pipeline.jobs import archive as archive_mod
    from pipeline.jobs import kafka_io

    client, _database = store
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    await sessions_in_topic(client, settings, tmp_path, broker, 4)
    topic = settings.kafka.topic_sessions
    bounds = await offset_bounds(settings.kafka, broker, await topic_partitions(broker, [topic]), exact=True)
    held = sorted(tp.partition for tp, (_begin, end) in bounds.items() if end > 0)
    read = kafka_io.read_ranges
    begins = aiokafka.AIOKafkaConsumer.beginning_offsets

    async def retention_meanwhile(bootstrap: str, ranges: Any, **kw: Any) -> Any:
        """Once the export has planned, retention deletes each partition's first record (Tansu has no
        DeleteRecords): the log start moves past it, and reading goes on from there."""
        async def deleted_first(self: Any, partitions: Any) -> Any:
            return {tp: max(offset, 1) for tp, offset in (await begins(self, partitions)).items()}

        monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "beginning_offsets", deleted_first)
        async with contextlib.aclosing(read(bootstrap, ranges, **kw)) as batches:
            async for rng, records in batches:
                if [r for r in records if r.offset >= 1]:
                    yield rng, [r for r in records if r.offset >= 1]

    monkeypatch.setattr(archive_mod, "read_ranges", retention_meanwhile)
    result = await export_from_kafka(settings, broker, tmp_path / "archive", ("sessions",))

    assert held and result.records == {"sessions": 4 - len(held)}
    assert sorted(result.lost) == [f"{topic}/{partition} offsets 0-0" for partition in held]

async def test_a_kafka_archive_in_its_1000th_epoch_is_continued_not_archived_again(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str) -> None:
    """Epochs are numbered `{n:03d}` (one per recreation of the topic noticed, as on every start of the embedded
    broker): from the 1,000th on, a rerun did not recognise the files and archived the partition again."""
    client, _database = store
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    await sessions_in_topic(client, settings, tmp_path, broker, 3)
    root = tmp_path / "archive"
    await export_from_kafka(settings, broker, root, ("sessions",))
    for path in archive_files(root):  # as the 1,000th epoch's export names them
        path.rename(path.with_name(path.name.replace("-e000-", "-e1000-")))

    again = await export_from_kafka(settings, broker, root, ("sessions",))

    assert again.files == [] and again.new_epochs == []
    assert sorted(str(r["object_id"]) for f in archive_files(root) for r in read_archive_file(f)) == \
        ["S0", "S1", "S2"]


async def test_a_replay_or_export_planned_while_tansu_did_not_tell_its_end_does_not_stop_short(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path, broker: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Tansu the topics' ends come from a Fetch high-watermark probe; a partition it got no answer for within 5 s
    (a busy broker) was given ListOffsets' answer, which Tansu under-reports (the first record of the last batch).
    A replay planned so stopped there and was done (`already-done` after, the rest never replayed); an export
    archived up to there as if that were all."""
    import aiokafka

    client, _database = store
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu", OCPI_TOPIC_PARTITIONS="1")
    await sessions_in_topic(client, settings, tmp_path, broker, 6)
    highwater = aiokafka.AIOKafkaConsumer.highwater
    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "highwater", lambda _self, _tp: None)  # the probe: no answer
    root = tmp_path / "archive"
    selection = Selection(modules=("sessions",))
    try:  # "run it again" is fine; stopping short as if complete is not
        exported: int | None = (await export_from_kafka(settings, broker, root, ("sessions",))).total
    except JobError:
        exported = None
    try:
        replayed: int | None = (await replay_kafka(settings, broker, selection)).sent
    except JobError:
        replayed = None
    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "highwater", highwater)
    report = await replay_kafka(settings, broker, selection)

    assert exported in (None, 6) and replayed in (None, 6)
    assert report.sent == 6



def test_archive_files_come_in_the_order_they_were_written_past_the_names_least_widths(
        store: tuple[Client, str], settings_for: Any, tmp_path: Path) -> None:
    """A replay sends a day's files in `archive_files` order, so their events reach the pipeline in that order (the
    first CDR of an id is the one stored, a later one with other content a CONFLICT). The names' numbers have least
    widths (`{n:04d}` chunks, `{n:03d}` epochs), and sorted as text the 10,000th chunk of a day came before the
    1,001st (and the 9,999th): a day's events were replayed out of the order they were received in, and a Kafka
    archive's 1,000th epoch (the newest records) before its 999th."""
    client, _database = store
    insert_sessions(client, 4)
    root = tmp_path / "archive"
    export_from_clickhouse(settings_for(), client, root, ("sessions",), max_records=1)
    files = archive_files(root)
    # What the 1,001st, 9,999th and 10,000th files of a generation are called (too many for a unit test to write).
    for path, number in zip(files[1:], ("1000", "9999", "10000"), strict=True):
        path.rename(path.with_name(path.name.replace(path.name[-10:], f"-{number}.avro")))
    assert [str(r["object_id"]) for f in archive_files(root) for r in read_archive_file(f)] == ["S0", "S1", "S2", "S3"]

    day = files[0].parent
    kafka_parts = ["part-ocpi.sessions.v1-0000-e999-000000000000-000000000009.avro",
                   "part-ocpi.sessions.v1-0000-e1000-000000000000-000000000004.avro"]
    for name in kafka_parts:
        (day / name).write_bytes(files[0].read_bytes())
    assert [f.name for f in archive_files(root) if "-e" in f.name] == kafka_parts


@pytest.mark.parametrize(("source", "records"), [("clickhouse", "0"), ("clickhouse", "-1"), ("kafka", "0")])
def test_an_export_file_size_that_cannot_work_is_refused_before_anything_runs(tmp_path: Path, chdb_dsn: str,
                                                                              source: str, records: str) -> None:
    """--max-records is the LIMIT of each ClickHouse page: 0 exported nothing and -1 (ClickHouse's last row) one event
    of each day (its last), either answered with success, the archive meant to outlive the TTL silently incomplete
    (and a rerun, asking again for the day's last row, adding nothing); from Kafka, 0 wrote a file per record."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner(env={"OCPI_DATA_DIR": str(tmp_path / "data"), "OCPI_CLICKHOUSE_DSN": chdb_dsn}).invoke(
        cli, ["export", str(tmp_path / "archive"), "--source", source, "--max-records", records])
    assert result.exit_code == 2 and "Invalid value for '--max-records'" in result.output, result.output


async def test_an_export_from_kafka_does_not_archive_what_the_worker_refuses(
        settings_for: Any, tmp_path: Path, broker: str) -> None:
    """fastavro reads some bytes that break the Avro spec (here a long of more than 64 bits, which it wraps); the
    worker's reader refuses them (a dead letter). The export read records with fastavro and wrote the datum again:
    the damaged record became a valid one in the archive, and a replay of that archive applied the wrong value."""
    import aiokafka

    from infra.kafka.admin import ensure_topics

    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    topic = settings.kafka.topic_locations
    await asyncio.to_thread(ensure_topics, broker, [topic], 1)
    connector = make_event(example("location_example.json"), Location, "Location", module="locations",
                           level="LOCATION", operation="PUT", received_at=DAY1)
    good = encode_event(connector.to_event())
    voltage = bytes([0xB8, 0x03])  # 220 (zigzag 440): the connectors' max_voltage
    assert voltage in good
    damaged = good.replace(voltage, bytes([0xB8, 0x83, *[0x80] * 7, 0x02]), 1)  # 220 plus bit 64
    assert decode_record(good, EVENT_SCHEMA)["event_id"] == connector.event_id
    # fastavro alone reads it (wrapped); the codec's generic reader checks it as the worker's does.
    assert fastavro.schemaless_reader(BytesIO(damaged[10:]), fastavro.parse_schema(current_schema(),
                                                                                  named_schemas={}))
    for read in (decode_event, lambda data: decode_record(data, EVENT_SCHEMA)):
        with pytest.raises(AvroCodecError, match="long of more than 64 bits"):
            read(damaged)
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, damaged, key=b"k")
        await producer.send_and_wait(topic, good, key=b"k")
    finally:
        await producer.stop()

    root = tmp_path / "archive"
    result = await export_from_kafka(settings, broker, root, ("locations",))
    assert result.undecodable == 1 and result.records["locations"] == 1
    archived = [r for f in archive_files(root) for r in read_archive_file(f)]
    assert len(archived) == 1 and decode_event(encode_record(EVENT_SCHEMA, archived[0])) == decode_event(good)


async def test_a_replay_of_a_directory_that_holds_no_archive_files_is_an_error(settings_for: Any,
                                                                               tmp_path: Path) -> None:
    """`replay --from-archive /backup` for `/backup/ocpi` (or any directory `export` did not write) planned no file,
    sent 0 events and recorded the job as completed, exit 0: a wrong path passed for an archive with nothing in it.
    An archive whose files the time range leaves out still replays nothing, without an error."""
    settings = settings_for()
    (tmp_path / "ocpi" / "cdrs" / "2024-05-01").mkdir(parents=True)
    with pytest.raises(JobError, match=r"no archive files of locations, sessions, cdrs .*<module>/<YYYY-MM-DD>"):
        await replay_archive(settings, "127.0.0.1:1", tmp_path, Selection(modules=("locations", "sessions", "cdrs")),
                             dry_run=True)
    _PartFile(tmp_path / "ocpi" / "cdrs" / "2024-05-01", "part-x", {}).commit("part-x.avro")
    with pytest.raises(JobError, match="no archive files of sessions"):
        await replay_archive(settings, "127.0.0.1:1", tmp_path / "ocpi", Selection(modules=("sessions",)),
                             dry_run=True)
    report = await replay_archive(settings, "127.0.0.1:1", tmp_path / "ocpi",
                                  Selection(modules=("cdrs",), since=datetime(2024, 6, 1, tzinfo=UTC)), dry_run=True)
    assert report.lines == [] and report.filtered == 0
    report = await replay_archive(settings, "127.0.0.1:1", tmp_path / "ocpi", Selection(modules=("cdrs",)),
                                  dry_run=True)
    assert [line.where for line in report.lines] == ["cdrs/2024-05-01/part-x.avro"]


def test_an_archive_compressed_with_a_codec_not_installed_here_is_named_so_not_taken_for_damaged(
        tmp_path: Path) -> None:
    """Export compressed with snappy wherever `cramjam` happened to be installed (no dependency of this project):
    read where it is not (another machine, a fresh install), every such file was "not a readable archive file
    ... restore it from a copy, or move it out of the archive", the advice to give up an intact archive, and the
    export into that directory stopped at it too (it reads the last file to continue)."""
    if importlib.util.find_spec("cramjam") or importlib.util.find_spec("snappy"):
        pytest.skip("snappy is installed here")
    event = make_event(example("session_example_2_short_finished.json"), Session, "Session", module="sessions",
                       level="SESSION", operation="PUT", received_at=DAY1)
    record = decode_record(encode_event(event.to_event()), EVENT_SCHEMA)
    buffer = BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(current_schema(), named_schemas={}), [record], codec="null")
    header = b"\x14avro.codec\x08null"
    assert buffer.getvalue().count(header) == 1
    path = tmp_path / "sessions" / DAY1.date().isoformat() / "part-snappy.avro"
    path.parent.mkdir(parents=True)
    path.write_bytes(buffer.getvalue().replace(header, b"\x14avro.codec\x0csnappy"))  # as with cramjam installed

    for read in (lambda: list(read_archive_file(path)), lambda: count_records(path)):
        with pytest.raises(JobError, match=r"part-snappy\.avro .*snappy.*cramjam") as raised:
            read()
        assert "move it out" not in str(raised.value) and "not a readable archive" not in str(raised.value)


def test_export_compresses_only_with_a_codec_every_install_of_this_version_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`container_codec` took snappy wherever `cramjam` (or `python-snappy`) was installed by chance: none of this
    project's dependencies, so the same version installed elsewhere could not read those archives. Zstandard
    comes with them (fastavro reads it with `backports.zstd`, which clickhouse-connect requires, or Python 3.14's
    `compression.zstd`); deflate always does."""
    real = importlib.util.find_spec
    installed = {"cramjam", "snappy"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("json") if name in installed else real(name, *a))
    assert container_codec() in ("zstandard", "deflate")
    monkeypatch.undo()
    buffer = BytesIO()
    fastavro.writer(buffer, "int", [7], codec=container_codec())
    assert list(fastavro.reader(BytesIO(buffer.getvalue()))) == [7]
