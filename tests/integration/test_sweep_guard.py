"""The deadline sweep against a real (embedded Tansu) broker: it reads what every worker of the group wrote, so it
waits until the whole group has read every partition to its end, including those this worker does not own.

The worker here owns partition 0 of every topic and has finished what it holds; partition 1 of the sessions
topic belongs to another member of the group, whose backlog holds the answers to the rows due (a parked PATCH's
PUT, an idle session's update). Its commits are made by hand: a group member's progress as the broker sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.codec import encode_event
from infra.kafka.admin import ensure_topics
from pipeline.agents import Progress
from pipeline.backlog import sweep_backlog
from pipeline.records import Record
from pipeline.sessions import process_sessions
from pipeline.sink import ClickHouseSink
from pipeline.state import SessionState
from pipeline.sweeps import Sweeper
from pipeline.topics import topic_names
from tests.unit.pipeline.builders import Harness, event, iso, session, stage_rules, ts

from .pipeline_support import pipeline_settings

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]


class OwnPartitions:
    """The worker's consumer as the sweep sees it: partition 0 of every topic."""

    def __init__(self, topics: Sequence[str]) -> None:
        self.topics = topics

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t, 0) for t in self.topics}


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def produce(bootstrap: str, records: list[tuple[str, int, bytes]]) -> None:
    """One batch per partition (so Tansu's ListOffsets would answer short of the end; the guard must not)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value, key=b"NL/TNM/S9", partition=partition)
                               for topic, partition, value in records])
    finally:
        await producer.stop()


async def test_the_sweep_waits_for_a_backlog_on_another_workers_partition(session_tmp: Path, chdb_dsn: str,
                                                                          broker: str) -> None:
    settings = pipeline_settings(session_tmp, chdb_dsn, broker)
    kafka, group = settings.kafka, settings.pipeline.app_id
    await asyncio.to_thread(ensure_topics, broker, topic_names(settings), 2)
    database = settings.clickhouse.database
    await asyncio.to_thread(migrate, connect(chdb_dsn), database)
    client = connect(chdb_dsn, database=database)
    sink = ClickHouseSink(lambda: connect(chdb_dsn, database=database))

    # What the group wrote so far: S9's PATCH parked, S2 ACTIVE, both received at minute 0.
    rules = stage_rules(park_ttl_min=5, idle_min=60)
    patch = event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(4))}, object_id="S9", received=0)
    active = event("Session", session("S2", status="ACTIVE"), received=0)
    written = Harness(process_sessions, SessionState, rules).run(
        *[Record(e, kafka.topic_sessions, 1, o, encode_event(e.to_event())) for o, e in enumerate([patch, active])])
    await sink.write(written.batch)
    # The other member's backlog on sessions/1 (S9's PUT, S2's update) after the two records it committed, and a
    # fact batch on party-facts/1; on partition 0, one record of this worker's, finished but not committed yet.
    put = event("Session", session("S9", status="ACTIVE", updated=3), received=3)
    update = event("Session", session("S2", status="ACTIVE", kwh="5", updated=59), received=59)
    sessions = [encode_event(e.to_event()) for e in (patch, active, put, update)]
    await produce(broker, [(kafka.topic_sessions, 1, value) for value in sessions]
                  + [(kafka.topic_sessions, 0, sessions[1]), (settings.pipeline.topic_party_facts, 1, b"[]")])
    progress = Progress()
    progress.mark([SimpleNamespace(topic=kafka.topic_sessions, partition=0, offset=0)])  # type: ignore[list-item]

    published: list[Any] = []

    async def publish(topic: str, records: list[Any]) -> None:
        published.extend(records)

    context = SimpleNamespace(progress=progress, sink=sink, stage_rules=rules, settings=settings, publish=publish,
                              app=SimpleNamespace(consumer=OwnPartitions(topic_names(settings))))
    sweeper = Sweeper(context, sweep_backlog(settings, broker, group))  # type: ignore[arg-type]

    async def no_retention(now: Any) -> None:
        return None

    sweeper.retention = no_retention  # type: ignore[method-assign]
    sessions_1 = TopicPartition(kafka.topic_sessions, 1)
    facts_1 = TopicPartition(settings.pipeline.topic_party_facts, 1)

    def swept() -> list[Any]:
        return list(client.query("SELECT kind, object_id FROM anomalies FINAL ORDER BY kind").result_rows) + list(
            client.query("SELECT object_id FROM raw_events FINAL WHERE outcome = 'ORPHANED'").result_rows)

    # The group never committed sessions/1: its owner has not started reading it.
    assert not await sweeper.run(ts(70))
    # Its owner is two records into the four (the party facts read): S9's PUT and S2's update are still in Kafka.
    await commit(broker, group, {sessions_1: 2, facts_1: 1})
    assert not await sweeper.run(ts(70))
    await commit(broker, group, {sessions_1: 3})
    assert not await sweeper.run(ts(70))
    assert swept() == [] and published == []
    # The module topics read to their end, but not the facts they produced last.
    await produce(broker, [(settings.pipeline.topic_party_facts, 1, b"[]")])
    await commit(broker, group, {sessions_1: 4})
    assert not await sweeper.run(ts(70))
    assert swept() == []
    # The whole group at the end (this worker's own sessions/0 counted from what it finished): the sweep runs.
    await commit(broker, group, {facts_1: 2})
    assert await sweeper.run(ts(70))
    assert swept() == [("ORPHAN_EVENT", "S9"), ("SESSION_IDLE", "S2"), ("S9",)]
    # This worker losing its partitions (a rebalance, more workers than partitions) stops its sweeps again.
    context.app.consumer = OwnPartitions([])
    assert not await sweeper.run(ts(80))
