"""infra.kafka.bulk.send_all on the embedded broker: every record arrives once, in order per partition, on the
partition `producer.send` would have chosen, and the acks name the offsets the records got."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.kafka.admin import ensure_topics
from infra.kafka.bulk import send_all
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

PARTITIONS = 3


async def _read_all(bootstrap: str, topic: str, total: int) -> dict[int, list[tuple[bytes, bytes, int]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        seen: dict[int, list[tuple[bytes, bytes, int]]] = {}
        count = 0
        async with asyncio.timeout(30):
            while count < total:
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    for m in messages:
                        seen.setdefault(tp.partition, []).append((m.key or b"", m.value or b"", m.offset))
                    count += len(messages)
        await asyncio.sleep(0.5)  # nothing more may come: no record twice
        for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
            assert not messages, f"unexpected extra records on {tp}"
        return seen
    finally:
        await consumer.stop()


def test_send_all_delivers_every_record_once_in_order_on_the_partitioners_partition(broker: str) -> None:
    topic = unique("bulk")
    ensure_topics(broker, [topic], PARTITIONS)
    # Small batches, so one partition's records need several of them.
    records = [(f"party-{i % 7}".encode(), f"value-{i:05d}".encode() * 20, None) for i in range(3000)]
    records += [(b"pinned", f"pinned-{i}".encode(), 2) for i in range(50)]

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker, max_batch_size=16 * 1024, linger_ms=5)
        await producer.start()
        try:
            acks = await send_all(producer, topic, records)
            assert sum(a.last_offset - a.first_offset + 1 for a in acks) == len(records)
            assert len({a.partition for a in acks}) == PARTITIONS
            assert len(acks) > PARTITIONS  # several batches per partition were needed
            expected: dict[int, list[tuple[bytes, bytes]]] = {}
            for key, value, partition in records:
                if partition is None:
                    partition = producer._partition(topic, None, None, None, key, value)
                expected.setdefault(partition, []).append((key, value))
        finally:
            await producer.stop()
        seen = await _read_all(broker, topic, len(records))
        assert {p: [(k, v) for k, v, _ in got] for p, got in seen.items()} == expected
        last_offsets = {p: got[-1][2] for p, got in seen.items()}
        for partition, last in last_offsets.items():
            assert max(a.last_offset for a in acks if a.partition == partition) == last

    asyncio.run(run())


def test_send_all_of_nothing_sends_nothing(broker: str) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            assert await send_all(producer, unique("never"), []) == []
        finally:
            await producer.stop()

    asyncio.run(run())


def test_send_all_with_batch_bytes_sends_one_record_batch_per_partition(broker: str) -> None:
    topic = unique("whole")
    ensure_topics(broker, [topic], PARTITIONS)
    records = [(f"key-{i % 11}".encode(), f"value-{i:05d}".encode() * 20, i % PARTITIONS) for i in range(3000)]

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker, max_batch_size=16 * 1024, linger_ms=5)
        await producer.start()
        try:
            acks = await send_all(producer, topic, records, batch_bytes=4 * 1024 * 1024)
        finally:
            await producer.stop()
        # 400 KB per partition: 25 of the producer's batches, one whole batch each here
        assert sorted((a.partition, a.first_offset, a.last_offset) for a in acks) == [
            (p, 0, 999) for p in range(PARTITIONS)]
        seen = await _read_all(broker, topic, len(records))
        assert {p: [(k, v) for k, v, _ in got] for p, got in seen.items()} == {
            p: [(k, v) for k, v, q in records if q == p] for p in range(PARTITIONS)}

    asyncio.run(run())
