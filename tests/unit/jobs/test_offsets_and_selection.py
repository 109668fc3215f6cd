"""Pure parts of the jobs: the time → offset binary search (the Tansu workaround), time arguments,
checkpoints, the replay selection and how a replayed record is built."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiokafka
import pytest
from aiokafka.structs import TopicPartition
from click.testing import CliRunner

import pipeline.jobs.kafka_io
import pipeline.jobs.replay
from infra.codec import decode_event, encode_event
from infra.events import build_event
from infra.kafka.admin import ensure_topics
from infra.kafka.compat import search_offset_for_time
from ocpi.decode import decode
from ocpi.identity import ObjectKey
from ocpi.model import Session
from pipeline.cli import cli
from pipeline.jobs.common import MODULES, Checkpoint, JobError, check_modules, job_id, parse_time, relative_text
from pipeline.jobs.replay import ReplayReport, Selection, _Run, plan_kafka
from tests.conftest import EXAMPLES
from tests.unit.jobs.fake_sender import session


class Partition:
    """Records as (offset, timestamp ms) with gaps, like a compacted partition; counts the probes."""

    def __init__(self, records: list[tuple[int, int]]) -> None:
        self.records = records
        self.probes = 0

    async def probe(self, offset: int) -> tuple[int, int] | None:
        self.probes += 1
        return next(((o, t) for o, t in self.records if o >= offset), None)


@pytest.mark.parametrize(("target", "want"), [
    (0, 0), (1000, 0), (1001, 3), (2500, 4), (3000, 4), (3001, 9), (9000, 9), (9001, 12),
])
async def test_binary_search_finds_the_first_offset_at_or_after_a_time(target: int, want: int) -> None:
    partition = Partition([(0, 1000), (3, 2000), (4, 3000), (9, 9000)])  # end offset 12 (trailing markers)
    assert await search_offset_for_time(partition.probe, 0, 12, target) == want


async def test_binary_search_needs_logarithmic_probes() -> None:
    partition = Partition([(o, 1_000 + o * 10) for o in range(100_000)])
    assert await search_offset_for_time(partition.probe, 0, 100_000, 1_000 + 61_234 * 10 - 5) == 61_234
    assert partition.probes <= 19  # log2(100000) + the final look-up
    empty = Partition([])
    assert await search_offset_for_time(empty.probe, 7, 7, 5) == 7 and empty.probes == 0


def test_parse_time_accepts_iso_dates_and_durations() -> None:
    now = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_time("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2024-05-01T14:00:00+02:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)  # no zone = UTC
    assert parse_time("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_time("90m", now=now) == now - timedelta(minutes=90)
    assert parse_time("2d", now=now) == now - timedelta(days=2)
    with pytest.raises(JobError, match="is not a time"):
        parse_time("yesterday")


def test_parse_time_refuses_a_time_outside_the_calendar_with_a_message() -> None:
    # A duration back past year 1, or an offset that moves year 1 before it, was an OverflowError: a traceback
    # from `replay --since` / `pull --since` instead of the message naming the value.
    for text in ("1000000w", "99999999d", "0001-01-01T00:00:00+01:00"):
        with pytest.raises(JobError, match="is not a time"):
            parse_time(text)


def test_checkpoint_is_replaced_atomically_and_job_ids_are_stable(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "jobs" / "x.json")
    assert checkpoint.load() is None
    checkpoint.save({"next": 5})
    checkpoint.save({"next": 7})
    assert checkpoint.load() == {"next": 7}
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["x.json"]  # no temp file left
    (tmp_path / "jobs" / "x.json").write_text("{broken")
    with pytest.raises(JobError, match="not valid JSON"):
        checkpoint.load()
    assert job_id("replay", {"a": 1, "b": [2]}) == job_id("replay", {"b": [2], "a": 1})
    assert job_id("replay", {"a": 1}) != job_id("replay", {"a": 2})


def test_a_relative_time_names_the_same_job_on_every_run() -> None:
    earlier, later = datetime(2024, 5, 10, 12, 0, tzinfo=UTC), datetime(2024, 5, 10, 12, 5, tzinfo=UTC)
    assert relative_text(" 6h ") == "6h" and relative_text("2024-05-01") is None and relative_text(None) is None

    def spec(now: datetime, since: str, until: str | None = None) -> dict[str, Any]:
        selection = Selection(modules=MODULES, partner="cpo-nl", since=parse_time(since, now=now),
                              until=parse_time(until, now=now) if until else None,
                              relative=(relative_text(since), relative_text(until)))
        return {"source": "kafka", **selection.spec()}

    assert job_id("replay", spec(earlier, "6h")) == job_id("replay", spec(later, "6h"))
    assert job_id("replay", spec(earlier, "6h")) != job_id("replay", spec(earlier, "5h"))
    assert spec(earlier, "2024-05-01", "1h")["since"] == "2024-05-01T00:00:00+00:00"  # as before: same job ids
    assert spec(earlier, "2024-05-01", "1h")["until"] == "1h"
    # A resumed job goes on with the instants its time range resolved to when it was planned.
    planned = Selection(modules=MODULES, since=parse_time("6h", now=earlier), relative=("6h", None))
    rerun = Selection(modules=MODULES, since=parse_time("6h", now=later), relative=("6h", None))
    assert rerun.as_planned({"resolved": planned.resolved()}) == planned
    assert rerun.as_planned({}) == rerun  # a checkpoint of an earlier version: its spec holds the instants


def test_modules_default_to_all_in_a_fixed_order() -> None:
    assert check_modules([]) == ("locations", "sessions", "cdrs")
    assert check_modules(["CDRS", "sessions"]) == ("sessions", "cdrs")
    with pytest.raises(JobError, match="tariffs"):
        check_modules(["tariffs"])


def _event(partner: str = "cpo-be", received_at: datetime | None = None) -> Any:
    body = (EXAMPLES / "session_example_2_short_finished.json").read_bytes()
    decoded = decode(body, Session)
    event = build_event(partner_id=partner, module="sessions", operation="PUT", level="SESSION",
                        key=ObjectKey("be", "bec", "101"), decoded=decoded, payload_type="Session", source="PUSH",
                        request_id="r1", correlation_id="c1",
                        received_at=received_at or datetime(2024, 5, 1, 12, tzinfo=UTC))
    return decode_event(encode_event(event))


def test_selection_checks_its_bounds_and_filters_partner_and_time() -> None:
    with pytest.raises(JobError, match="--since must be before --until"):
        Selection(modules=("cdrs",), since=datetime(2024, 5, 2, tzinfo=UTC), until=datetime(2024, 5, 1, tzinfo=UTC))
    with pytest.raises(JobError, match="--from-offset must be below --to-offset"):
        Selection(modules=("cdrs",), from_offset=5, to_offset=5)
    window = Selection(modules=("sessions",), partner="cpo-be", since=datetime(2024, 5, 1, 12, tzinfo=UTC),
                       until=datetime(2024, 5, 1, 13, tzinfo=UTC))
    assert window.matches(_event())
    assert not window.matches(_event(partner="other"))
    assert not window.matches(_event(received_at=datetime(2024, 5, 1, 13, tzinfo=UTC)))  # until is exclusive
    assert not window.matches(_event(received_at=datetime(2024, 5, 1, 11, 59, 59, tzinfo=UTC)))
    assert not window.by_offset and Selection(modules=("cdrs",), partition=0).by_offset


async def test_a_partition_no_selected_topic_has_is_an_error_not_an_empty_replay(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay --partition 9` on topics of 4 partitions planned nothing, sent 0 events and recorded the job as
    completed, exit 0: a typo passed for a replay that had nothing to do."""
    settings = settings_for()

    async def partitions_of(_bootstrap: str, *topics: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for topic in topics for p in range(4)]

    async def offset_bounds(_kafka: Any, _bootstrap: str, tps: list[TopicPartition],
                            **_kw: Any) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: (0, 10) for tp in tps}

    monkeypatch.setattr(pipeline.jobs.replay, "partitions_of", partitions_of)
    monkeypatch.setattr(pipeline.jobs.replay, "offset_bounds", offset_bounds)
    with pytest.raises(JobError, match=r"--partition 9: .* partitions 0-3"):
        await plan_kafka(settings, "127.0.0.1:1", Selection(modules=("cdrs", "sessions"), partition=9))
    planned = await plan_kafka(settings, "127.0.0.1:1", Selection(modules=("cdrs",), partition=3))
    assert [(m, r.partition, r.start, r.stop) for m, r in planned] == [("cdrs", 3, 0, 10)]
    # A resumed job whose topics were recreated with fewer partitions: the partition is gone, nothing left to read.
    assert await plan_kafka(settings, "127.0.0.1:1", Selection(modules=("cdrs",), partition=9), resumed=True) == []


async def test_a_replay_reaching_before_what_retention_left_says_so(
        settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay --module cdrs` (all of it), `--from-offset 0` or `--since` a time before what Kafka still holds:
    the replay started at the oldest record left, sent what it found and ended as a success, the records retention
    had deleted unmentioned, as if the job had replayed everything asked for. It names those partitions (in the
    dry run too), and where the rest may be: an archive. A selection that starts within what is held is silent."""
    settings = settings_for()
    cdrs = settings.kafka.topic_cdrs

    async def partitions_of(_bootstrap: str, *topics: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for topic in topics for p in range(3)]

    async def offset_bounds(_kafka: Any, _bootstrap: str, tps: list[TopicPartition],
                            **_kw: Any) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: [(1200, 5000), (0, 5000), (300, 300)][tp.partition] for tp in tps}  # 2: every record deleted

    async def offsets_at(_kafka: Any, _bootstrap: str, _moment: datetime,
                         bounds: dict[TopicPartition, tuple[int, int]]) -> dict[TopicPartition, int]:
        return {tp: b for tp, (b, _e) in bounds.items()}  # every record held is stamped after --since

    async def nothing_read(*_args: Any, **_kwargs: Any) -> Any:
        for _ in ():
            yield

    monkeypatch.setattr(pipeline.jobs.replay, "partitions_of", partitions_of)
    monkeypatch.setattr(pipeline.jobs.replay, "offset_bounds", offset_bounds)
    monkeypatch.setattr(pipeline.jobs.replay, "offsets_at", offsets_at)
    monkeypatch.setattr(pipeline.jobs.replay, "read_ranges", nothing_read)
    monkeypatch.setattr(pipeline.jobs.kafka_io, "log_starts", lambda _b, tps: asyncio.sleep(0, dict.fromkeys(tps, 0)))
    since = datetime(2024, 5, 1, tzinfo=UTC)
    for selection in (Selection(modules=("cdrs",)), Selection(modules=("cdrs",), from_offset=0),
                      Selection(modules=("cdrs",), since=since)):
        report = await pipeline.jobs.replay.replay_kafka(settings, "127.0.0.1:1", selection, dry_run=True)
        assert report.truncated == [f"{cdrs}/0 (from offset 1200)", f"{cdrs}/2 (from offset 300)"], selection
    for selection in (Selection(modules=("cdrs",), from_offset=1500), Selection(modules=("cdrs",), partition=1)):
        report = await pipeline.jobs.replay.replay_kafka(settings, "127.0.0.1:1", selection, dry_run=True)
        assert report.truncated == [], selection


def test_the_replay_command_names_the_partitions_whose_start_retention_deleted(
        settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cdrs = settings_for().kafka.topic_cdrs

    async def replayed(*_args: Any, **_kwargs: Any) -> ReplayReport:
        return ReplayReport(job="replay-x", status="done", sent=3, truncated=[f"{cdrs}/0 (from offset 1200)"])

    monkeypatch.setattr(pipeline.jobs.replay, "replay_kafka", replayed)
    result = CliRunner().invoke(cli, ["replay", "--module", "cdrs"],
                                env={"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_DATA_DIR": str(tmp_path),
                                     "OCPI_TOPIC_CDRS": cdrs})
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{cdrs}/0 (from offset 1200)" in " ".join(result.output.split()) and "--from-archive" in result.output


async def test_records_retention_deletes_while_a_replay_reads_are_named(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long replay, or one resumed days after it was interrupted, whose planned records retention deleted before
    it read them: the consumer goes on from the oldest record still held (`read_ranges`), and the replay ended as
    a success, those records neither sent nor named (the export names them as lost). Offsets skipped that were
    never records (transaction markers, below the log start still) are not named."""
    from types import SimpleNamespace

    settings = settings_for()
    sessions = settings.kafka.topic_sessions

    async def partitions_of(_bootstrap: str, *topics: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for topic in topics for p in range(2)]

    async def offset_bounds(_kafka: Any, _bootstrap: str, tps: list[TopicPartition],
                            **_kw: Any) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: (0, 6) for tp in tps}

    async def read_ranges(_bootstrap: str, ranges: Any, **_kw: Any) -> Any:
        for rng in ranges:  # partition 0: offsets 0-3 deleted meanwhile; partition 1: a marker at 2
            held = range(4, 6) if rng.partition == 0 else (0, 1, 3, 4, 5)
            yield rng, [SimpleNamespace(offset=o, value=encode_event(_event().to_event())) for o in held]

    async def log_starts(_bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 4 if tp.partition == 0 else 0 for tp in tps}

    class Producer:
        written: dict[TopicPartition, int] = {}

        def __init__(self, *_args: Any) -> None:
            pass

        async def __aenter__(self) -> Any:
            return self

        async def __aexit__(self, *_exc: object) -> None:
            pass

        async def send_all(self, records: list[Any]) -> int:
            return len(records)

    monkeypatch.setattr(pipeline.jobs.replay, "partitions_of", partitions_of)
    monkeypatch.setattr(pipeline.jobs.replay, "offset_bounds", offset_bounds)
    monkeypatch.setattr(pipeline.jobs.replay, "read_ranges", read_ranges)
    monkeypatch.setattr(pipeline.jobs.kafka_io, "log_starts", log_starts)
    monkeypatch.setattr(pipeline.jobs.replay, "JobProducer", Producer)
    report = await pipeline.jobs.replay.replay_kafka(settings, "127.0.0.1:1", Selection(modules=("sessions",)))
    assert report.lost == [f"{sessions}/0 offsets 0-3"]
    assert report.sent == 7  # what was held is replayed all the same


@pytest.mark.parametrize("args", [["--partition", "-1"], ["--from-offset", "-5"], ["--to-offset", "0"]])
def test_a_negative_partition_or_offset_is_refused(args: list[str], tmp_path: Path) -> None:
    """--partition -1 selected no partition (an empty replay, exit 0); --to-offset 0 or less selected no offset."""
    result = CliRunner().invoke(cli, ["replay", "--dry-run", *args], env={"OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '" + args[0] in result.output


def test_a_replayed_record_is_the_recorded_event_marked_replay(settings_for: Any) -> None:
    settings = settings_for()
    report = ReplayReport(job="t", status="done")
    run = _Run(settings, Selection(modules=("sessions",)), report)
    original = _event()
    prepared = run.prepare(original, "sessions")
    assert prepared is not None
    topic, key, value = prepared
    replayed = decode_event(value)
    assert (topic, key) == (settings.kafka.topic_sessions, b"BE/BEC/101")
    assert replayed.source == "REPLAY"
    assert {**replayed.to_event(), "source": "PUSH"} == original.to_event()  # id, hash, payload unchanged
    assert run.prepare(original, "sessions") is None and report.duplicates == 1  # each event id once per run
    assert run.prepare(_event(), "sessions") is not None  # another event id
    assert _Run(settings, Selection(modules=("cdrs",)), report).prepare(original, "sessions") is None
    assert report.filtered == 1
    assert json.loads(json.dumps(report.__dict__, default=str))["sent"] == 0


def test_an_event_that_does_not_fit_the_topic_it_was_read_from_is_not_replayed(settings_for: Any) -> None:
    """The pipeline dead-letters a well-formed event that does not fit its topic (`records.misfit`: another module's
    event, an EVSE push without evse_uid). Replayed, its copy was published to its module's topic: another dead
    letter at every replay (a new row of `dead_letters`, keyed by the copy's offset), or, for another module's event,
    applied there (a CDR found on the Sessions topic billed by the replay)."""
    settings = settings_for()
    report = ReplayReport(job="t", status="done")
    run = _Run(settings, Selection(modules=MODULES), report)
    assert run.prepare(_event(), "cdrs") is None  # a Session found on the CDRs topic
    assert run.module_of(settings.kafka.topic_cdrs) == "cdrs"
    assert report.undecodable == 1 and report.filtered == 0 and run.seen == set()
    assert run.prepare(_event(), "sessions") is not None


def test_a_rebuild_reads_every_topic_the_receivers_write_as_it_is_and_renames_the_rest() -> None:
    # Renamed, the rejections topic would be empty for the rebuild worker and its empty table swapped in.
    from infra.settings import load_settings
    from pipeline.jobs.rebuild import _internal_topics, _source_topics

    settings = load_settings({})
    kafka = settings.kafka
    sources = _source_topics(settings)
    assert sources == [kafka.topic_locations, kafka.topic_sessions, kafka.topic_cdrs, kafka.topic_rejections]
    renamed = _internal_topics(settings, "g")
    assert "OCPI_TOPIC_REJECTIONS" not in renamed and "OCPI_TOPIC_SESSIONS" not in renamed
    assert renamed["OCPI_TOPIC_PARTY_FACTS"] == f"{settings.pipeline.topic_party_facts}.g"


async def test_reading_ranges_moves_to_the_oldest_record_retention_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # On OffsetOutOfRange (retention deleted the records at the position) aiokafka resets by auto_offset_reset;
    # its default, "latest", would jump past every record still held and end the range as if it were read.
    from pipeline.jobs import kafka_io

    created: list[dict[str, Any]] = []

    class Stop(Exception):
        pass

    def consumer(bootstrap: str, **options: Any) -> Any:
        created.append(options)
        raise Stop

    monkeypatch.setattr(kafka_io, "_consumer", consumer)
    with pytest.raises(Stop):
        [batch async for batch in kafka_io.read_ranges("kafka:9092", [kafka_io.PartitionRange("t", 0, 5, 9)])]
    assert created[0]["auto_offset_reset"] == "earliest"


async def test_a_kafka_client_whose_start_failed_is_stopped() -> None:
    """Kafka down: the jobs' one-line error came with aiokafka's "Unclosed AIOKafkaConsumer" warnings, the client
    whose start failed never stopped."""
    from pipeline.jobs.kafka_io import start_client

    class Client:
        stopped = False

        async def start(self) -> None:
            raise OSError("Kafka does not answer")

        async def stop(self) -> None:
            self.stopped = True

    client = Client()
    with pytest.raises(OSError, match="does not answer"):
        await start_client(client)  # type: ignore[arg-type]
    assert client.stopped


async def test_a_since_replay_on_tansu_finds_an_event_written_before_a_late_record_stamped_earlier(
        settings_for: Any, broker: str) -> None:
    """Record timestamps are set as each producer hands a record over, so several producers (receivers, a pull,
    a replay) write them to a partition out of time order, by up to a producer's request timeout: a record
    stamped before `--since` may land after one stamped later. The binary search over record timestamps took
    the partition for sorted; probing the late record it moved past the event before it, which `--since` asked
    for, and the replay left it out without a word (Kafka's own ListOffsets keeps the maximum timestamp so far
    and finds it)."""
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu", OCPI_TOPIC_PARTITIONS="1")
    topic = settings.kafka.topic_sessions
    await asyncio.to_thread(ensure_topics, broker, [topic], 1)
    since = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    # (seconds after `since` of its receipt and record timestamp): the event wanted, then the late one
    received = [-60, 1, -5, 10, 20]
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for number, seconds in enumerate(received, start=1):
            at = since + timedelta(seconds=seconds)
            body = session(number, at)
            decoded = decode(json.dumps(body), Session)
            key = ObjectKey.of(decoded.value)
            event = build_event(partner_id="cpo-x", module="sessions", operation="PUT", level="SESSION", key=key,
                                decoded=decoded, payload_type="Session", source="PUSH", request_id=f"r{number}",
                                correlation_id=f"c{number}", received_at=at)
            await producer.send_and_wait(topic, encode_event(event), key=key.kafka_key(),
                                         timestamp_ms=int(at.timestamp() * 1000))
    finally:
        await producer.stop()

    plan = await pipeline.jobs.replay.replay_kafka(settings, broker, Selection(modules=("sessions",), since=since),
                                                   dry_run=True)

    assert sum(line.matching or 0 for line in plan.lines) == 3  # received 1, 10 and 20 s after `since`
    assert plan.lines[0].where.endswith("offsets 1-4")  # from the first record stamped at or after `since`
