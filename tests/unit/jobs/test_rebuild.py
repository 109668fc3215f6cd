"""`replay --rebuild` run twice at once: the engines and the rebuild worker are faked, the swap logic is real."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import pytest

from pipeline.jobs import kafka_io
from pipeline.jobs import rebuild as rebuild_mod
from pipeline.jobs.common import Checkpoint, JobError, jobs_dir


class FakeClient:
    """Tables per database (name → UUID); EXCHANGE TABLES takes a moment, as it does on a busy server."""

    def __init__(self, tables: dict[str, dict[str, str]]) -> None:
        self.tables = tables

    def command(self, sql: str) -> None:
        found = re.fullmatch(r"EXCHANGE TABLES `(\w+)`\.`(\w+)` AND `(\w+)`\.`(\w+)`", sql)
        assert found, sql
        time.sleep(0.05)
        live, table, fresh, _table = found.groups()
        self.tables[live][table], self.tables[fresh][table] = self.tables[fresh][table], self.tables[live][table]

    def close(self) -> None:
        pass


class FakeWorker:
    returncode = 0

    def poll(self) -> None:
        return None


async def test_a_second_rebuild_while_one_runs_is_refused_and_leaves_the_swap_whole(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `replay --rebuild` at once (a second terminal, a scheduled one) shared the checkpoint: both swapped,
    and each exchange done twice is undone, so the live database kept its old tables (or a mix of old and new)
    while both reported success."""
    settings = settings_for()
    live, fresh = settings.clickhouse.database, f"{settings.clickhouse.database}_rebuild_x"
    new = {"cdrs": "new-1", "sessions": "new-2", "reconciliation": "new-3"}
    client = FakeClient({live: {"cdrs": "old-1", "sessions": "old-2", "reconciliation": "old-3"}, fresh: dict(new)})
    # A rebuild whose worker has built the fresh tables: it is about to swap (as after a rerun of an interrupted one).
    Checkpoint(jobs_dir(settings, "rebuild") / "current.json").save(
        {"job": "rebuild-x", "status": "swapping", "database": live, "rebuild_database": fresh,
         "group": "ocpi-pipeline-rebuild-x", "started_at": "2024-05-01T00:00:00+00:00",
         "targets": [["t", 0, 0, 5]], "new_uuids": new})

    async def nothing(*_args: Any, **_kwargs: Any) -> Any:
        return None

    async def committed(*_args: Any, **_kwargs: Any) -> dict[Any, int]:
        return {}

    monkeypatch.setattr(rebuild_mod, "effective_dsn", lambda _s: ("http://clickhouse.invalid:8123", None))
    monkeypatch.setattr(rebuild_mod, "connect", lambda *_a, **_k: client)
    monkeypatch.setattr(rebuild_mod, "_check_key", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_tables", lambda c, database: dict(c.tables[database]))
    monkeypatch.setattr(rebuild_mod, "_committed", committed)
    monkeypatch.setattr(rebuild_mod, "offset_bounds", committed)
    monkeypatch.setattr(rebuild_mod, "_start_worker", lambda *_a: FakeWorker())
    monkeypatch.setattr(rebuild_mod, "_wait_built", lambda *_a: asyncio.sleep(0, 0))
    monkeypatch.setattr(rebuild_mod, "_wait_internal", nothing)
    monkeypatch.setattr(rebuild_mod, "terminate", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_drop_worker_topics", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_drop_worker_state", lambda *_a: None)

    first, second = await asyncio.gather(rebuild_mod.rebuild(settings, "broker.invalid:9092"),
                                         rebuild_mod.rebuild(settings, "broker.invalid:9092"),
                                         return_exceptions=True)

    assert client.tables[live] == new  # every rebuilt table is live, none exchanged back
    refused = [r for r in (first, second) if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], JobError) and "running already" in str(refused[0])


async def test_a_rebuild_interrupted_while_it_deletes_its_workers_topics_does_not_run_that_worker_again(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the finished rebuild deleted its worker's topics (the deletion, in a thread, still ran to its
    end) left the checkpoint at "tail": the rerun started the rebuild worker again, into the live database,
    with its changelogs (and maybe its local state) gone, so from an empty state."""
    settings = settings_for()
    live, fresh = settings.clickhouse.database, f"{settings.clickhouse.database}_rebuild_x"
    checkpoint = Checkpoint(jobs_dir(settings, "rebuild") / "current.json")
    checkpoint.save({"job": "rebuild-x", "status": "tail", "database": live, "rebuild_database": fresh,
                     "group": "ocpi-pipeline-rebuild-x", "started_at": "2024-05-01T00:00:00+00:00",
                     "targets": [["t", 0, 0, 5]], "tail": [["t", 0, 5, 7]], "swapped": ["cdrs"]})
    started: list[str] = []
    dropped: list[str] = []

    async def nothing(*_args: Any, **_kwargs: Any) -> Any:
        return None

    async def built(*_args: Any) -> int:
        return 2

    def drop_topics(*_args: Any) -> None:
        dropped.append("topics")
        if len(dropped) == 1:
            raise KeyboardInterrupt  # what the job sees of a Ctrl-C there (its task is cancelled)

    monkeypatch.setattr(rebuild_mod, "effective_dsn", lambda _s: ("http://clickhouse.invalid:8123", None))
    monkeypatch.setattr(rebuild_mod, "connect", lambda *_a, **_k: FakeClient({}))
    monkeypatch.setattr(rebuild_mod, "_check_key", lambda *_a: None)
    def start_worker(*args: Any) -> FakeWorker:
        started.append(args[-1])  # the database it writes
        return FakeWorker()

    monkeypatch.setattr(rebuild_mod, "_start_worker", start_worker)
    monkeypatch.setattr(rebuild_mod, "_wait_built", built)
    monkeypatch.setattr(rebuild_mod, "_wait_internal", nothing)
    monkeypatch.setattr(rebuild_mod, "terminate", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_drop_worker_topics", drop_topics)
    monkeypatch.setattr(rebuild_mod, "_drop_worker_state", lambda *_a: dropped.append("state"))

    with pytest.raises(KeyboardInterrupt):
        await rebuild_mod.rebuild(settings, "broker.invalid:9092")
    assert started == [live]
    report = await rebuild_mod.rebuild(settings, "broker.invalid:9092")

    assert started == [live]  # not again: its topics are gone
    assert dropped == ["topics", "topics", "state"]  # the cleanup is finished
    assert report.swapped == ["cdrs"] and (checkpoint.load() or {})["status"] == "done"


@pytest.mark.parametrize("partial_history", [False, True])
async def test_a_rebuild_from_topics_whose_start_retention_deleted_is_refused_unless_told(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch, partial_history: bool) -> None:
    """On Kafka the module topics keep OCPI_RETENTION_RAW_DAYS of history. A rebuild from what is left swapped in
    tables without the CDRs, Sessions and Locations only the deleted records held (billing years back gone from
    the live database), reporting success."""
    from aiokafka.structs import TopicPartition

    settings = settings_for()
    migrated: list[str] = []
    started: list[str] = []

    async def partitions(_bootstrap: str, topics: list[str]) -> list[TopicPartition]:
        return [TopicPartition(topic, 0) for topic in topics]

    async def bounds(_kafka: Any, _bootstrap: str, tps: list[TopicPartition],
                     **_kwargs: Any) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: (1200 if tp.topic == settings.kafka.topic_cdrs else 0, 5000) for tp in tps}

    class Stop(Exception):
        pass

    def start_worker(*args: Any) -> FakeWorker:
        started.append(args[-1])
        raise Stop  # far enough: the rebuild went ahead

    monkeypatch.setattr(rebuild_mod, "effective_dsn", lambda _s: ("http://clickhouse.invalid:8123", None))
    monkeypatch.setattr(rebuild_mod, "connect", lambda *_a, **_k: FakeClient({}))
    monkeypatch.setattr(rebuild_mod, "_check_key", lambda *_a: None)
    monkeypatch.setattr(kafka_io, "topic_partitions", partitions)  # under kafka_io.partitions_of
    monkeypatch.setattr(rebuild_mod, "offset_bounds", bounds)
    monkeypatch.setattr(rebuild_mod, "migrate", lambda _client, database: migrated.append(database))
    monkeypatch.setattr(rebuild_mod, "apply_ttls", lambda *_a: [])
    monkeypatch.setattr(rebuild_mod, "_start_worker", start_worker)
    checkpoint = Checkpoint(jobs_dir(settings, "rebuild") / "current.json")

    if not partial_history:
        with pytest.raises(JobError, match=rf"{settings.kafka.topic_cdrs}/0 \(from offset 1200\)"):
            await rebuild_mod.rebuild(settings, "broker.invalid:9092")
        assert migrated == [] and started == [] and checkpoint.load() is None  # nothing was changed
        return
    with pytest.raises(Stop):
        await rebuild_mod.rebuild(settings, "broker.invalid:9092", partial_history=True)
    state = checkpoint.load() or {}
    assert migrated == [state["rebuild_database"]] and started == [state["rebuild_database"]]
    assert [settings.kafka.topic_cdrs, 0, 1200, 5000] in state["targets"]


def test_truncated_partitions_names_those_not_starting_at_0() -> None:
    assert rebuild_mod.truncated_partitions([["a", 0, 0, 9], ["a", 1, 7, 9], ["b", 3, 1, 1]]) == [
        "a/1 (from offset 7)", "b/3 (from offset 1)"]


async def test_a_rebuild_refuses_to_start_when_a_topic_it_reads_does_not_exist(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source topic missing on the Kafka it was pointed at (a wrong OCPI_TOPIC_CDRS or bootstrap, a new cluster)
    was left out of the targets without a word: the rebuild worker created it empty, and the swap put empty
    `cdrs` and `billing_lines` tables in the live database, the billing history left in the rebuild database."""
    from aiokafka.structs import TopicPartition

    settings = settings_for()
    started: list[str] = []

    async def partitions(_bootstrap: str, topics: Any) -> list[TopicPartition]:
        return [TopicPartition(t, 0) for t in topics if t != settings.kafka.topic_for("cdrs")]

    async def bounds(_kafka: Any, _bootstrap: str, tps: Any, **_kwargs: Any) -> dict[Any, tuple[int, int]]:
        return {tp: (0, 5) for tp in tps}

    monkeypatch.setattr(rebuild_mod, "effective_dsn", lambda _s: ("http://clickhouse.invalid:8123", None))
    monkeypatch.setattr(rebuild_mod, "connect", lambda *_a, **_k: FakeClient({}))
    monkeypatch.setattr(rebuild_mod, "_check_key", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "migrate", lambda *a: started.append(a[-1]))
    monkeypatch.setattr(rebuild_mod, "apply_ttls", lambda *_a: [])
    monkeypatch.setattr(kafka_io, "topic_partitions", partitions)  # under kafka_io.partitions_of
    monkeypatch.setattr(rebuild_mod, "offset_bounds", bounds)
    monkeypatch.setattr(rebuild_mod, "_start_worker", lambda *a: started.append(a[-1]) or FakeWorker())

    with pytest.raises(JobError, match=re.escape(settings.kafka.topic_for("cdrs"))):
        await rebuild_mod.rebuild(settings, "broker.invalid:9092")
    assert started == []  # no rebuild database migrated (left behind empty), no worker


def test_the_dry_run_lists_every_partition_the_rebuild_reads_and_says_when_it_would_refuse(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run planned the module topics only: a truncated rejections topic, which the rebuild reads and
    refuses on, went unmentioned, though README says the dry run says so."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    settings = settings_for()

    async def targets(_settings: Any, _bootstrap: str) -> list[list[Any]]:
        return [[settings.kafka.topic_cdrs, 0, 0, 7], [settings.kafka.topic_rejections, 0, 40, 90]]

    monkeypatch.setattr(rebuild_mod, "source_targets", targets)
    env = {"OCPI_DATA_DIR": str(settings.storage.path), "OCPI_KAFKA_BOOTSTRAP": "broker.invalid:9092",
           "OCPI_TOPIC_CDRS": settings.kafka.topic_cdrs, "OCPI_TOPIC_REJECTIONS": settings.kafka.topic_rejections,
           "COLUMNS": "200"}
    result = CliRunner().invoke(cli, ["replay", "--rebuild", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert "rejections" in result.output and "40-89" in result.output and "0-6" in result.output
    assert "retention deleted the start of 1 partition(s)" in result.output


async def test_the_gap_after_the_swap_is_never_cut_short_by_tansus_list_offsets(
        settings_for: Any, monkeypatch: pytest.MonkeyPatch, broker: str) -> None:
    """On Tansu the end offsets come from a Fetch high-watermark probe; a partition it got no answer for within 5 s
    (a busy broker) was given ListOffsets' answer, which Tansu under-reports (1 for ten records sent in one batch).
    The gap after the swap then ended short: the records past it, which the live worker had written into the
    tables swapped out, were never written into the swapped-in ones (CDRs missing from billing), and the rebuild
    reported success."""
    import aiokafka
    from aiokafka.structs import TopicPartition

    from infra.kafka.admin import ensure_topics

    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    topic = settings.kafka.topic_cdrs
    await asyncio.to_thread(ensure_topics, broker, [topic], 1)
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker, linger_ms=50, enable_idempotence=False)
    await producer.start()
    try:  # one batch of ten records
        await asyncio.gather(*[await producer.send(topic, b"record %d" % i, key=b"k") for i in range(10)])
    finally:
        await producer.stop()
    live, fresh = settings.clickhouse.database, f"{settings.clickhouse.database}_rebuild_x"
    new = {"cdrs": "new-1"}
    client = FakeClient({live: {"cdrs": "old-1"}, fresh: dict(new)})
    checkpoint = Checkpoint(jobs_dir(settings, "rebuild") / "current.json")
    checkpoint.save({"job": "rebuild-x", "status": "swapping", "database": live, "rebuild_database": fresh,
                     "group": "ocpi-pipeline-rebuild-x", "started_at": "2024-05-01T00:00:00+00:00",
                     "targets": [[topic, 0, 0, 1]], "new_uuids": new})
    tails: list[list[Any]] = []

    async def committed(*_args: Any) -> dict[Any, int]:
        return {TopicPartition(topic, 0): 1}  # where the rebuild worker stopped

    async def built(_bootstrap: str, _state: Any, ranges: list[list[Any]], *_args: Any) -> int:
        tails.extend(ranges)
        return sum(e - b for _t, _p, b, e in ranges)

    async def nothing(*_args: Any, **_kwargs: Any) -> Any:
        return None

    monkeypatch.setattr(rebuild_mod, "effective_dsn", lambda _s: ("http://clickhouse.invalid:8123", None))
    monkeypatch.setattr(rebuild_mod, "connect", lambda *_a, **_k: client)
    monkeypatch.setattr(rebuild_mod, "_check_key", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_tables", lambda c, database: dict(c.tables[database]))
    monkeypatch.setattr(rebuild_mod, "_committed", committed)
    monkeypatch.setattr(rebuild_mod, "_start_worker", lambda *_a: FakeWorker())
    monkeypatch.setattr(rebuild_mod, "_wait_built", built)
    monkeypatch.setattr(rebuild_mod, "_wait_internal", nothing)
    monkeypatch.setattr(rebuild_mod, "terminate", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_drop_worker_topics", lambda *_a: None)
    monkeypatch.setattr(rebuild_mod, "_drop_worker_state", lambda *_a: None)
    highwater = aiokafka.AIOKafkaConsumer.highwater
    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "highwater", lambda _self, _tp: None)  # the probe: no answer

    with contextlib.suppress(JobError):  # "run it again" is fine; a gap ending short is not
        await rebuild_mod.rebuild(settings, broker)
    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "highwater", highwater)
    if (checkpoint.load() or {})["status"] != "done":
        await rebuild_mod.rebuild(settings, broker)

    assert client.tables[live] == new
    assert tails == [[topic, 0, 1, 10]]  # the whole gap, to the topic's real end


async def test_the_fresh_database_gets_the_configured_ttls_before_it_is_swapped_in(
        settings_for: Any, chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fresh database was made by the migrations alone, whose TTLs are fixed defaults (30 days raw, 365
    history, 7 years billing), and the live worker sets the configured ones once, at its first sweep: after the
    swap, with OCPI_RETENTION_BILLING_YEARS=10 the tables deleted billing rows from 7 years (raw events from 30
    days with OCPI_RETENTION_RAW_DAYS=90) until the worker restarted or someone ran `retention apply`."""
    from aiokafka.structs import TopicPartition

    from infra.clickhouse.client import connect
    from pipeline import retention

    settings = settings_for(OCPI_RETENTION_BILLING_YEARS="10", OCPI_RETENTION_RAW_DAYS="90")
    client = connect(chdb_dsn)

    async def partitions(_bootstrap: str, topics: list[str]) -> list[TopicPartition]:
        return [TopicPartition(topic, 0) for topic in topics]

    async def bounds(_kafka: Any, _bootstrap: str, tps: list[TopicPartition],
                     **_kwargs: Any) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: (0, 5) for tp in tps}

    class Stop(Exception):
        pass

    def start_worker(*_args: Any) -> FakeWorker:
        raise Stop  # the worker would write into the fresh database from here on

    monkeypatch.setattr(rebuild_mod, "effective_dsn", lambda _s: ("http://clickhouse.invalid:8123", None))
    monkeypatch.setattr(rebuild_mod, "connect", lambda *_a, **_k: client)
    monkeypatch.setattr(rebuild_mod, "_check_key", lambda *_a: None)
    monkeypatch.setattr(kafka_io, "topic_partitions", partitions)
    monkeypatch.setattr(rebuild_mod, "offset_bounds", bounds)
    monkeypatch.setattr(rebuild_mod, "_start_worker", start_worker)
    with pytest.raises(Stop):
        await rebuild_mod.rebuild(settings, "broker.invalid:9092")
    fresh = (Checkpoint(jobs_dir(settings, "rebuild") / "current.json").load() or {})["rebuild_database"]
    current = retention.current_ttls(connect(chdb_dsn), fresh)
    wanted = {ttl.table: ttl.expression for data_class in retention.policy(settings) for ttl in data_class.ttls}
    assert {table: current[table] for table in wanted} == wanted
    assert retention.apply_ttls(connect(chdb_dsn), fresh, settings) == []


def test_the_swap_keeps_the_live_record_of_the_pseudonymisation_key(chdb_dsn: str) -> None:
    """`pseudonym_key` is not derived from the topics: the first process that ran on the store recorded its key's
    fingerprint there, when and by whom. The swap exchanged it for the fresh database's, which holds the rebuild
    worker's own row of the rebuild's time: once the rebuild database was dropped, the record of the key in force
    since the store began was gone (README, Retention: the configuration tables are kept)."""
    from datetime import UTC, datetime

    from infra.clickhouse.client import connect
    from infra.clickhouse.migrations import migrate
    from tests.conftest import unique

    client = connect(chdb_dsn)
    live, fresh = unique("live"), unique("live_rebuild")
    try:
        for database in (live, fresh):
            migrate(client, database)
        first = datetime(2024, 5, 1, 12, tzinfo=UTC)
        client.insert(f"`{live}`.pseudonym_key", [["f" * 32, first, "worker"]],
                      column_names=["fingerprint", "recorded_at", "recorded_by"])
        client.insert(f"`{fresh}`.pseudonym_key", [["f" * 32, datetime.now(UTC), "worker"]],
                      column_names=["fingerprint", "recorded_at", "recorded_by"])
        state = {"database": live, "rebuild_database": fresh, "new_uuids": rebuild_mod._tables(client, fresh)}

        swapped = rebuild_mod._swap(client, state)

        assert "cdrs" in swapped and "pseudonym_key" not in swapped
        assert client.query(f"SELECT recorded_at, recorded_by FROM `{live}`.pseudonym_key").result_rows == [
            (first, "worker")]
    finally:
        for database in (live, fresh):
            client.command(f"DROP DATABASE IF EXISTS `{database}`")
        client.close()
