"""A worker on topics whose partition counts are not its OCPI_TOPIC_PARTITIONS, on Tansu and chDB (README,
"Partitions and scaling out"): the state changelogs follow their source topics, and a changelog that differs
from its source stops the worker at start with a message naming both."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from infra.kafka.admin import ensure_topics, partition_counts
from infra.kafka.bulk import key_partition
from infra.process import spawn, terminate
from pipeline.retention import changelog_topic
from pipeline.stack import Stack
from tests.unit.pipeline.builders import iso, location, session, ts

from .pipeline_support import pipeline_settings, publish, record, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]


async def test_a_worker_with_another_partition_setting_serves_every_partition_of_the_module_topics(
        session_tmp: Path, chdb_dsn: str, broker: str) -> None:
    """`serve` (here the stack) created the module topics with 2 partitions; the worker runs with
    OCPI_TOPIC_PARTITIONS=1. Every Location, whichever partition its key went to, reaches ClickHouse."""
    stack = await Stack(pipeline_settings(session_tmp, chdb_dsn, broker), run_worker=False,
                        run_receivers=False).start()
    log_path = stack.log_dir / "worker-one.log"
    child = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                  env={**stack.child_environment(), "OCPI_TOPIC_PARTITIONS": "1"}, log_path=log_path)
    try:
        ids = [f"LOC{n}" for n in range(20)]  # keys in both partitions
        await publish(stack.bootstrap, [record(stack.settings, "Location", {**location(), "id": i}) for i in ids])
        assert stack.clickhouse is not None
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM locations FINAL",
                              lambda r: r[0][0] >= len(ids), timeout=90)
        assert rows[0][0] == len(ids), log_path.read_text()
        # Their state was written too: an EVSE PATCH of each is applied to its Location.
        await publish(stack.bootstrap, [
            record(stack.settings, "EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(10))}, object_id=i,
                   evse_uid="E1") for i in ids])
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM evses FINAL WHERE status = 'CHARGING'",
                              lambda r: r[0][0] >= len(ids), timeout=60)
        assert rows[0][0] == len(ids), log_path.read_text()
        assert child.poll() is None, log_path.read_text()
        changelog = changelog_topic(stack.settings.pipeline.app_id, "location-state")
        assert partition_counts(stack.bootstrap, [changelog]) == {changelog: 2}
    finally:
        terminate(child, 20)
        await stack.stop()


async def test_a_worker_refuses_a_topic_whose_partitions_differ_from_its_changelogs(
        session_tmp: Path, chdb_dsn: str, broker: str) -> None:
    """The module topics have 2 partitions, the Locations' state changelog 1 (partitions added to the topic after
    it): the worker stops at start, naming both, instead of failing on the state of partition 1. The changelog
    holds state (an empty one with another count is taken for one the broker created on first use, and made
    again with its source's count: tests/integration/test_broker_outage.py)."""
    import aiokafka

    settings = pipeline_settings(session_tmp, chdb_dsn, broker)
    changelog = changelog_topic(settings.pipeline.app_id, "location-state")
    await asyncio.to_thread(ensure_topics, broker, [changelog], 1)
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(changelog, b"state", key=b"NL/TNM/LOC1")
    finally:
        await producer.stop()
    stack = await Stack(settings, run_worker=False, run_receivers=False).start()
    log_path = stack.log_dir / "worker-refused.log"
    child = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                  env=stack.child_environment(), log_path=log_path)
    try:
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert child.poll() not in (None, 0), log_path.read_text()
        assert (f"{settings.kafka.topic_locations} has 2 partitions, its state changelog {changelog} has 1"
                in log_path.read_text())
    finally:
        terminate(child, 20)
        await stack.stop()


async def test_an_event_in_another_partition_than_its_keys_is_a_dead_letter_not_a_second_copy(
        session_tmp: Path, chdb_dsn: str, broker: str) -> None:
    """A producer whose partitioner is not murmur2 (librdkafka's default: kcat, confluent-kafka) puts a Location PUT
    keyed by its Location in another partition than the receivers would: its state is in the key's partition, so the
    worker makes it a dead letter instead of a second copy of the Location in the other."""
    import aiokafka

    stack = await Stack(pipeline_settings(session_tmp, chdb_dsn, broker), run_receivers=False).start()
    try:
        topic, key, value = record(stack.settings, "Location", {**location(), "id": "MISPLACED"})
        count = partition_counts(stack.bootstrap, [topic])[topic]
        wrong = (key_partition(key, count) + 1) % count
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=stack.bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=key, partition=wrong)
        finally:
            await producer.stop()
        assert stack.clickhouse is not None
        rows = await wait_for(stack.clickhouse, f"SELECT kafka_partition, error FROM dead_letters "
                              f"WHERE key_hex = '{key.hex()}'", lambda r: bool(r), timeout=90)
        assert [(partition, "places it in partition" in error) for partition, error in rows] == [(wrong, True)]
        located = stack.clickhouse.query("SELECT count() FROM locations WHERE location_id = 'MISPLACED'")
        assert located.result_rows == [(0,)]
    finally:
        await stack.stop()


async def test_a_topic_created_again_under_its_name_stops_the_worker_instead_of_skipping_its_events(
        session_tmp: Path, chdb_dsn: str, broker: str) -> None:
    """The Sessions topic deleted and created again under its name while the app id's state was folded from the
    old one: its offsets start again from 0, below the offset the state of Session S1 holds, and its events would be
    skipped as records read again after a crash. The worker exits with code 78 before writing anything of them."""
    from infra.kafka.admin import delete_topics

    settings = pipeline_settings(session_tmp, chdb_dsn, broker)
    stack = await Stack(settings, run_worker=False, run_receivers=False).start()
    log_path = stack.log_dir / "worker-rewound.log"
    child = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                  env=stack.child_environment(), log_path=log_path)
    try:
        updates = [record(settings, "Session", session(kwh=str(n), updated=n)) for n in range(8)]
        await publish(stack.bootstrap, updates)
        assert stack.clickhouse is not None
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM raw_events", lambda r: r[0][0] >= 8, timeout=90)
        assert rows[0][0] == 8, log_path.read_text()
        terminate(child, 20)
        topic = settings.kafka.topic_sessions
        await asyncio.to_thread(delete_topics, stack.bootstrap, [topic])
        await asyncio.to_thread(ensure_topics, stack.bootstrap, [topic], 2)
        # The group's offsets of the old topic go with it (Kafka and Tansu alike): it is read from offset 0.
        await publish(stack.bootstrap, [record(settings, "SessionPatch", {"kwh": 99, "last_updated": iso(ts(20))},
                                               object_id="S1")])
        child = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                      env=stack.child_environment(), log_path=log_path)
        deadline = time.monotonic() + 90
        while child.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert child.poll() == 78, log_path.read_text()[-3000:]
        assert "created again under its name" in log_path.read_text()
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM raw_events", lambda r: r[0][0] > 8, timeout=1)
        assert rows[0][0] == 8
    finally:
        terminate(child, 20)
        await stack.stop()
