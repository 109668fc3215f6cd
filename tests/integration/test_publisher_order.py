"""The receivers' publisher keeps one object's records in the order of the answers, on the embedded broker.

Tansu has no idempotent producer, so nothing but the connection keeps a partition's records in order: the producer
sends one request at a time to a broker, and the broker handles a connection's requests in turn. A push answered
3000 because its ack did not come within the send timeout may still be written by the broker; the next push of
the same object must then be written after it, not overtake it on a fresh connection (an equal `last_updated`
would let the earlier one, applied last, undo it: `pipeline.ordering`).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.admin import RECORD_MAX_BYTES, delete_topics, ensure_topics
from infra.kafka.publisher import Publisher, PublishError
from infra.settings import load_settings
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]


async def _values(bootstrap: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=2 * RECORD_MAX_BYTES, fetch_max_bytes=4 * RECORD_MAX_BYTES)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        found: list[bytes] = []
        # To the partition's end (2 s without a record is no end on a slow machine fetching 75 MB), then 1 s more:
        # a record written after that end would be one the test must see too.
        end = (await consumer.end_offsets([tp]))[tp]
        deadline = time.monotonic() + 120
        while await consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"the topic was not read to its end ({end}) in 120 s"
            batches = await consumer.getmany(timeout_ms=500)
            found += [(r.value or b"")[:3] for records in batches.values() for r in records]
        for _ in range(2):
            batches = await consumer.getmany(timeout_ms=500)
            found += [(r.value or b"")[:3] for records in batches.values() for r in records]
        return found
    finally:
        await consumer.stop()


async def test_a_push_answered_3000_is_not_written_after_the_next_push_of_its_object(broker: str) -> None:
    # A 15 MB record takes the broker longer than the send timeout: answered 3000, and written all the same.
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": broker, "OCPI_KAFKA_FLAVOR": "tansu",
                           "OCPI_KAFKA_SEND_TIMEOUT": "0.02"}).kafka
    topic = unique("order")
    await asyncio.to_thread(ensure_topics, broker, [topic], 1, {topic: {"max.message.bytes": str(RECORD_MAX_BYTES)}})
    publisher = Publisher(kafka, broker)
    await publisher.start()
    try:
        await publisher.publish(topic, b"K", b"W--")  # connected, metadata known
        for n in range(5):
            with pytest.raises(PublishError):
                await publisher.publish(topic, b"K", b"A%d-" % n + os.urandom(15 * 1024 * 1024))
            # The partner's next push of the object, resent until acknowledged: each attempt has the 0.02 s send
            # timeout too, and a loaded machine's broker can take longer than that for many attempts in a row.
            for _attempt in range(2000):
                try:
                    await publisher.publish(topic, b"K", b"B%d-" % n)
                    break
                except PublishError:
                    await asyncio.sleep(0.01)
            else:
                pytest.fail(f"B{n} never acknowledged")
    finally:
        await publisher.stop()
    try:
        values = await _values(broker, topic)
        for n in range(5):
            a, b = b"A%d-" % n, b"B%d-" % n
            assert b in values and a in values, values
            assert len(values) - 1 - values[::-1].index(a) < values.index(b), (n, values)  # every A before any B
    finally:
        await asyncio.to_thread(delete_topics, broker, [topic])
