"""Send many records at once through an aiokafka producer's batch API, and wait for every ack.

`AIOKafkaProducer.send` costs several microseconds of Python per record (a metadata check, the partitioner, a
future and its callbacks), which a worker producing one or two records per event pays over and over. Records
for one partition are appended here to a `BatchBuilder` instead (aiokafka's C record builder) and each full
batch is sent once: the broker sees the same records, keys, partitions and order.

A Kafka record batch is appended to the log, replicated and read back as a unit, so records that must be
kept together (a batch's state changes in a changelog, `pipeline.agents.StateTable`) are sent with a larger
`batch_bytes`: one record batch per partition, written whole or not at all.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

# (key, value, partition or None for the producer's partitioner)
OutgoingRecord = tuple[bytes | None, bytes | None, int | None]


@dataclass(frozen=True, slots=True)
class Acked:
    """The broker's ack of one sent batch: its records have offsets `first_offset` … `last_offset`."""

    partition: int
    first_offset: int
    last_offset: int


async def send_all(producer: AIOKafkaProducer, topic: str, records: Sequence[OutgoingRecord],
                   *, batch_bytes: int | None = None) -> list[Acked]:
    """Send `records` to `topic`, in order per partition, and return once the broker acknowledged all of them.

    A record without a partition goes where `producer.send` would put it (the producer's own partitioner on
    the key), so a key keeps its partition whichever way it was sent. Batches are the producer's
    `max_batch_size`, or `batch_bytes` when given (at most the topic's `max.message.bytes` and the producer's
    `max_request_size`). Raises what the producer raises.
    """
    if not records:
        return []
    await producer.partitions_for(topic)  # metadata for the partitioner and the partition check
    by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    # What `producer.send` does per record (AIOKafkaProducer._partition), with the topic's partition lists built
    # once per call instead of once per record: the same partitioner on the same lists gives the same partition.
    metadata = producer.client.cluster
    all_partitions = list(metadata.partitions_for_topic(topic) or ())
    available = list(metadata.available_partitions_for_topic(topic) or ())
    partitioner = _fast_partitioner(producer._partitioner)  # aiokafka keeps it private
    for key, value, partition in records:
        if partition is None:
            partition = partitioner(key, all_partitions, available)
        by_partition.setdefault(partition, []).append((key, value))
    sent: list[tuple[int, int, asyncio.Future[object]]] = []
    try:
        for partition, items in by_partition.items():
            batch = new_batch(producer, batch_bytes)
            count = 0
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                    if count:
                        sent.append((partition, count, await producer.send_batch(batch, topic, partition=partition)))
                        batch = new_batch(producer, batch_bytes)
                        count = 0
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a batch for {topic}")
                count += 1
            sent.append((partition, count, await producer.send_batch(batch, topic, partition=partition)))
    except BaseException:
        # The batches already handed over complete later; retrieve their outcomes then, so none is left unread.
        for _, _, future in sent:
            future.add_done_callback(_retrieve)
        raise
    results = await asyncio.gather(*(future for _, _, future in sent), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [Acked(partition, metadata.offset, metadata.offset + count - 1)  # type: ignore[attr-defined]
            for (partition, count, _), metadata in zip(sent, results, strict=True)]


def new_batch(producer: AIOKafkaProducer, batch_bytes: int | None) -> Any:
    """An empty batch: the producer's own (`max_batch_size`), or one of up to `batch_bytes`, built as
    `producer.create_batch` builds it (aiokafka fixes the size when the producer is made)."""
    if batch_bytes is None:
        return producer.create_batch()
    accumulator: Any = producer._message_accumulator  # aiokafka keeps it private
    return BatchBuilder(batch_bytes, accumulator._compression_type, is_transactional=False)


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java client `Utils.murmur2`), as `aiokafka.partitioner.murmur2` computes it, reading the
    key four bytes at a time (aiokafka's reads byte by byte: 2.2 µs per key, for every reconciliation record)."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def key_partition(key: bytes, partitions: int) -> int:
    """The partition of a keyed record among `partitions`, as Kafka's Java client and aiokafka place it (our
    producers, the receivers'): murmur2 of the key. librdkafka's default partitioner (CRC32) places keys elsewhere."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _default_partition(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """`DefaultPartitioner()(key, all_partitions, available)` with the faster murmur2."""
    if key is None:
        return DefaultPartitioner()(key, all_partitions, available)  # a random choice: aiokafka's own
    return all_partitions[key_partition(key, len(all_partitions))]


def _fast_partitioner(partitioner: Any) -> Callable[[bytes | None, list[int], list[int]], int]:
    """The producer's partitioner, with the faster murmur2 when it is aiokafka's default one."""
    return _default_partition if type(partitioner) is DefaultPartitioner else partitioner
