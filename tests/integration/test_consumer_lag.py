"""`report consumer-lag` on the embedded broker: a group's unread records, when the oldest of them was written,
and what is left of its retention (the arithmetic over partitions is in tests/unit/pipeline/test_consumer_lag.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.kafka.admin import ensure_topics
from infra.settings import load_settings
from pipeline import reports
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def test_the_oldest_unread_record_and_its_retention_left(broker: str) -> None:
    topic, group = unique("lag"), unique("group")
    ensure_topics(broker, [topic], 1)
    now = datetime.now(UTC).replace(microsecond=0)
    written = [now - timedelta(days=10 - i) for i in range(10)]  # one record a day, the last one today

    async def run() -> list[tuple[object, ...]]:
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            for i, moment in enumerate(written):
                await producer.send_and_wait(topic, f"r{i}".encode(), timestamp_ms=int(moment.timestamp() * 1000))
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.commit({tp: 4})  # the worker processed records 0-3
        finally:
            await consumer.stop()
        _columns, rows = await reports.consumer_lag(load_settings({}).kafka, broker, group, [topic],
                                                    retention_days=30, now=now)
        return [tuple(row) for row in rows]

    assert asyncio.run(run()) == [(topic, 1, 4, 10, 6, written[4], 24.0, 0)]
