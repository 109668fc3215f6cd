"""ClickHouse goes away under a running worker (README, "An outage must end well within the raw retention"): the
worker retries the batch and commits nothing past it; once ClickHouse answers again the batch is written and the
offsets move on, without a restart of the worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from infra.clickhouse.shim import ClickHouseShim
from pipeline.stack import Stack
from tests.unit.pipeline.builders import location

from .pipeline_support import pipeline_settings, publish, record, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The consumer group's committed offsets on `topic`, summed (a partition without one counts 0)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close()


async def test_a_worker_commits_nothing_while_clickhouse_is_down_and_writes_once_it_is_back(
        session_tmp: Path, chdb_dsn: str, broker: str) -> None:
    settings = pipeline_settings(session_tmp, chdb_dsn, broker)
    stack = await Stack(settings, run_receivers=False).start()
    assert stack.clickhouse is not None and stack.shim is not None
    worker = stack.children["worker"]
    group, topic, partitions = settings.pipeline.app_id, settings.kafka.topic_locations, settings.kafka.partitions
    try:
        await publish(stack.bootstrap, [record(settings, "Location", {**location(), "id": f"A{n}"})
                                        for n in range(5)])
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM locations FINAL", lambda r: r[0][0] >= 5, 90)
        assert rows == [(5,)]
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(committed, broker, group, topic, partitions) < 5:
            assert time.monotonic() < deadline, "the first batch's offsets were never committed"
            await asyncio.sleep(0.5)

        # The store's server goes away (the worker reaches chDB through the shim, as it would a server).
        engine, port = stack.shim.engine, stack.shim.port
        await stack.shim.stop()
        await publish(stack.bootstrap, [record(settings, "Location", {**location(), "id": f"B{n}"})
                                        for n in range(5)])
        await asyncio.sleep(8)  # several commit intervals (1 s) and insert retries
        assert worker.poll() is None
        assert await asyncio.to_thread(committed, broker, group, topic, partitions) == 5

        stack.shim = await ClickHouseShim(engine, stack.admin_token, port=port).start()
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM locations FINAL", lambda r: r[0][0] >= 10, 90)
        assert rows == [(10,)]
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(committed, broker, group, topic, partitions) < 10:
            assert time.monotonic() < deadline, "the offsets did not move on once ClickHouse was back"
            await asyncio.sleep(0.5)
        assert worker.poll() is None
    finally:
        await stack.stop()
