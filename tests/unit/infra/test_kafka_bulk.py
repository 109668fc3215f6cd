"""infra.kafka.bulk.send_all against a fake producer: batching per partition, acks, failures (the broker
round trip is in tests/integration/test_kafka_bulk.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from infra.kafka.bulk import _default_partition, _fast_partitioner, murmur2, new_batch, send_all


@dataclass
class FakeBatch:
    capacity: int
    records: list[tuple[bytes | None, bytes | None]] = field(default_factory=list)

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: None) -> object | None:
        if len(self.records) >= self.capacity or len(value or b"") > 100:
            return None
        self.records.append((key, value))
        return object()


@dataclass
class Metadata:
    offset: int


class FakeCluster:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}


class FakeProducer:
    """Batches of at most `capacity` records; keys partitioned by their length; `fail_on` send fails."""

    def __init__(self, capacity: int = 3, fail_on: int | None = None) -> None:
        self.capacity = capacity
        self.fail_on = fail_on
        self.sent: list[tuple[int, list[tuple[bytes | None, bytes | None]]]] = []
        self.next_offset: dict[int, int] = {}
        self.futures: list[asyncio.Future[Any]] = []

        self.client = SimpleNamespace(cluster=FakeCluster())

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    @staticmethod
    def _partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        assert all_partitions == [0, 1, 2] and available == [0, 1, 2]  # what AIOKafkaProducer._partition passes
        return all_partitions[len(key or b"") % len(all_partitions)]

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        if self.fail_on is not None and len(self.sent) == self.fail_on:
            raise TimeoutError("no room in the accumulator")
        self.sent.append((partition, batch.records))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        base = self.next_offset.get(partition, 0)
        self.next_offset[partition] = base + len(batch.records)
        future.set_result(Metadata(base))
        self.futures.append(future)
        return future


def run(producer: FakeProducer, records: list[tuple[bytes | None, bytes | None, int | None]]) -> Any:
    return asyncio.run(send_all(producer, "t", records))  # type: ignore[arg-type]


def test_records_are_batched_per_partition_in_order_and_acked_with_their_offsets() -> None:
    producer = FakeProducer(capacity=3)
    records: list[tuple[bytes | None, bytes | None, int | None]] = [
        (b"k" * (i % 2 + 1), f"v{i}".encode(), None) for i in range(8)]  # keys of length 1 and 2
    records.append((b"x", b"pinned", 0))
    acks = run(producer, records)
    by_partition: dict[int, list[bytes | None]] = {}
    for partition, batch in producer.sent:
        assert 0 < len(batch) <= 3
        by_partition.setdefault(partition, []).extend(value for _, value in batch)
    assert by_partition == {1: [b"v0", b"v2", b"v4", b"v6"], 2: [b"v1", b"v3", b"v5", b"v7"], 0: [b"pinned"]}
    assert [(a.partition, a.first_offset, a.last_offset) for a in acks] == [
        (1, 0, 2), (1, 3, 3), (2, 0, 2), (2, 3, 3), (0, 0, 0)]


def test_nothing_to_send_sends_nothing() -> None:
    producer = FakeProducer()
    assert run(producer, []) == []
    assert producer.sent == []


def test_a_failed_send_raises_and_the_batches_sent_before_are_still_read() -> None:
    producer = FakeProducer(capacity=1, fail_on=1)
    with pytest.raises(TimeoutError):
        run(producer, [(b"a", b"1", 0), (b"a", b"2", 0)])
    assert len(producer.sent) == 1 and producer.futures[0].done()


@pytest.mark.parametrize("before", [[], [(b"a", b"small", 0)]])
def test_a_record_larger_than_a_batch_is_refused(before: list[tuple[bytes, bytes, int]]) -> None:
    producer = FakeProducer()
    with pytest.raises(ValueError, match="does not fit"):
        run(producer, [*before, (b"a", b"x" * 200, 0)])
    assert all(batch for _, batch in producer.sent)  # no empty batch went out


# Kafka's own vectors (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java), signed 32-bit.
KAFKA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                 b"a-little-bit-longer-string": -1486304829,
                 b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}


def test_murmur2_gives_kafkas_values() -> None:
    for key, signed in KAFKA_MURMUR2.items():
        assert murmur2(key) == signed & 0xFFFFFFFF


@given(key=st.binary(max_size=80), partitions=st.integers(1, 64))
def test_keys_go_to_the_partition_aiokafka_chooses(key: bytes, partitions: int) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)
    all_partitions = list(range(partitions))
    assert _default_partition(key, all_partitions, all_partitions) == DefaultPartitioner()(key, all_partitions,
                                                                                            all_partitions)


def test_only_aiokafkas_default_partitioner_is_replaced() -> None:
    assert _fast_partitioner(DefaultPartitioner()) is _default_partition
    custom = lambda key, all_partitions, available: 0  # noqa: E731
    assert _fast_partitioner(custom) is custom
    assert _default_partition(None, [0, 1, 2], [1]) == 1  # no key: a random available partition


def test_a_batch_of_batch_bytes_holds_what_the_producers_batch_size_would_split() -> None:
    async def fill() -> tuple[int, int]:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", max_batch_size=16 * 1024)  # never started
        counts = []
        for batch in (new_batch(producer, None), new_batch(producer, 1024 * 1024)):
            count = 0
            while count < 500 and batch.append(key=b"k", value=b"v" * 1000, timestamp=None) is not None:
                count += 1
            counts.append(count)
        return counts[0], counts[1]

    producers_batch, whole = asyncio.run(fill())
    assert producers_batch < 20 and whole == 500
