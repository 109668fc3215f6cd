"""Kafka access for jobs: partition offset ranges, reading them, and how far a consumer group got.

Offsets go through `infra.kafka.compat` (the Tansu workarounds apply only when `settings.kafka.is_tansu`).
Jobs read with a group-less consumer (no commits, no rebalances): their position is their own checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiokafka
from aiokafka.structs import ConsumerRecord, TopicPartition

from infra.kafka import compat
from infra.settings import KafkaSettings
from pipeline.jobs.common import JobError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionRange:
    """Offsets [start, stop) of one partition."""

    topic: str
    partition: int
    start: int
    stop: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def span(self) -> int:
        return max(self.stop - self.start, 0)

    def as_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "start": self.start, "stop": self.stop}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartitionRange:
        return cls(str(data["topic"]), int(data["partition"]), int(data["start"]), int(data["stop"]))


async def start_client(client: aiokafka.AIOKafkaConsumer | aiokafka.AIOKafkaProducer) -> None:
    """Start an aiokafka client; one whose start failed (Kafka down) is stopped, not left to warn "Unclosed
    AIOKafkaConsumer" under the job's one-line error."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


async def stop_client(client: aiokafka.AIOKafkaConsumer | aiokafka.AIOKafkaProducer) -> None:
    """Stop an aiokafka client without losing a cancellation (Ctrl-C) that arrives meanwhile.

    aiokafka's stop() awaits its fetch task under `suppress(CancelledError)`, which also swallows a
    cancellation of *our* task landing there: the job would go on after Ctrl-C. Re-raise it.
    """
    await client.stop()
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _consumer(bootstrap: str, **options: Any) -> aiokafka.AIOKafkaConsumer:
    return aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                     group_id=options.pop("group_id", None), **options)


async def topic_partitions(bootstrap: str, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of the topics that exist (a missing topic has none)."""
    consumer = _consumer(bootstrap)
    await start_client(consumer)
    try:
        existing = await consumer.topics()
        found: list[TopicPartition] = []
        for topic in topics:
            if topic in existing:
                found.extend(TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ()))
        return found
    finally:
        await stop_client(consumer)


async def partitions_of(bootstrap: str, *topics: str) -> list[TopicPartition]:
    """Every partition of `topics`; JobError when one does not exist (a wrong OCPI_TOPIC_* or bootstrap): a job
    reading it would find nothing and report success ("sent 0 events", "nothing new")."""
    found = await topic_partitions(bootstrap, topics)
    missing = sorted(set(topics) - {tp.topic for tp in found})
    if missing:
        raise JobError(f"topic {', '.join(missing)} does not exist on the Kafka at {bootstrap}; check "
                       "OCPI_KAFKA_BOOTSTRAP and the OCPI_TOPIC_* settings")
    return found


async def log_starts(bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The first offset each partition still holds (retention deletes the records below it)."""
    consumer = _consumer(bootstrap)
    await start_client(consumer)
    try:
        return {tp: int(offset) for tp, offset in (await consumer.beginning_offsets(tps)).items()}
    finally:
        await stop_client(consumer)


async def deleted_below(bootstrap: str, rng: PartitionRange, start: int, stop: int) -> str | None:
    """Offsets [start, stop) of `rng` a reading went past without a record: those now below the partition's log
    start were deleted by retention after the job planned (the consumer goes on from the oldest record still
    held), named as "<topic>/<partition> offsets a-b"; None when none were (transaction markers)."""
    begin = (await log_starts(bootstrap, [rng.tp]))[rng.tp]
    if begin > start:
        return f"{rng.topic}/{rng.partition} offsets {start}-{min(begin, stop) - 1}"
    return None


async def offset_bounds(kafka: KafkaSettings, bootstrap: str, tps: list[TopicPartition], *,
                        exact: bool = False) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset still held, end offset) of each partition; the end through the Tansu-safe helper.

    `exact`: on Tansu, a partition whose end the probe could not read (no answer in time) is a JobError rather
    than ListOffsets' answer there, which may be short of the end: for a caller that would stop short of it.
    """
    if not tps:
        return {}
    begins = await log_starts(bootstrap, tps)
    ends = await compat.end_offsets(kafka, bootstrap, tps, exact=exact)
    unknown = sorted(f"{tp.topic}/{tp.partition}" for tp in tps if tp not in ends)
    if unknown:
        raise JobError(f"Kafka did not tell the end offset of {', '.join(unknown)} in time (is the broker busy?); "
                       "run the same command again")
    return {tp: (int(begins[tp]), max(int(ends[tp]), int(begins[tp]))) for tp in tps}


async def offsets_at(kafka: KafkaSettings, bootstrap: str, moment: datetime,
                     bounds: Mapping[TopicPartition, tuple[int, int]]) -> dict[TopicPartition, int]:
    """The first offset of each partition whose record timestamp is >= `moment`."""
    target = int(moment.timestamp() * 1000)
    return await compat.offsets_for_times(kafka, bootstrap, dict.fromkeys(bounds, target),
                                          {tp: b for tp, (b, _e) in bounds.items()},
                                          {tp: e for tp, (_b, e) in bounds.items()})


Records = list[ConsumerRecord[Any, Any]]


async def read_ranges(bootstrap: str, ranges: Iterable[PartitionRange], *, batch: int = 500,
                      idle_timeout: float = 30.0,
                      stall_is_error: bool = False) -> AsyncGenerator[tuple[PartitionRange, Records], None]:
    """Yield (range, records) in offset order per partition until every range is read to its stop.

    Use it under `contextlib.aclosing`, so the consumer stops even when the reader leaves early.

    A partition whose position stops moving below its stop for `idle_timeout` seconds (trailing transaction
    markers, or a broker that stopped answering: aiokafka logs fetch errors and returns nothing) ends early,
    with a warning; with `stall_is_error` it raises JobError instead, for a caller that would otherwise take the
    early end for the end of its ranges. Records retention deleted below the position are skipped: reading
    goes on from the oldest one still held.
    """
    pending = {r.tp: r for r in ranges if r.span > 0}
    if not pending:
        return
    # When retention deleted the records at the position (a long job, a resumed one), the consumer moves to the
    # oldest record still held; aiokafka's default ("latest") would move past every remaining one to the end,
    # which looks like a finished range.
    consumer = _consumer(bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_wait_ms=100,
                         auto_offset_reset="earliest")
    await start_client(consumer)
    try:
        consumer.assign(list(pending))
        for tp, wanted in pending.items():
            consumer.seek(tp, wanted.start)
        loop = asyncio.get_running_loop()
        last_move = loop.time()
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=500, max_records=batch)
            moved = False
            for tp, records in fetched.items():
                reading = pending.get(tp)
                if reading is None:
                    continue
                inside = [r for r in records if reading.start <= r.offset < reading.stop]
                if inside:
                    moved = True
                    # A cancellation point between batches even when the data is buffered: Ctrl-C stops the
                    # job after the batch in hand, not after everything fetched.
                    await asyncio.sleep(0)
                    yield reading, inside
            for tp in list(pending):
                if await consumer.position(tp) >= pending[tp].stop:
                    del pending[tp]
                    consumer.pause(tp)
                    moved = True
            if moved:
                last_move = loop.time()
            elif loop.time() - last_move > idle_timeout:
                behind = sorted(f"{t.topic}/{t.partition}" for t in pending)
                if stall_is_error:
                    raise JobError(f"Kafka delivered no records for {idle_timeout:.0f}s below the stop offsets of "
                                   f"{', '.join(behind)} (is the broker reachable?); the checkpoint keeps the "
                                   "position: run the same command again to resume")
                log.warning("no records for %.0fs below the stop offsets of %s; ending there", idle_timeout, behind)
                return
    finally:
        await stop_client(consumer)


async def first_record_times(bootstrap: str, positions: Mapping[TopicPartition, int], *,
                             timeout: float = 10.0) -> dict[TopicPartition, datetime]:
    """The timestamp of the first record at or after each partition's position (a partition with none read
    within `timeout` is left out)."""
    moments: dict[TopicPartition, datetime] = {}
    ranges = [PartitionRange(tp.topic, tp.partition, position, position + 1) for tp, position in positions.items()]
    async with contextlib.aclosing(read_ranges(bootstrap, ranges, batch=1, idle_timeout=timeout)) as reading:
        async for span, records in reading:
            moments.setdefault(span.tp, datetime.fromtimestamp(records[0].timestamp / 1000, UTC))
    return moments


async def committed_offsets(bootstrap: str, group_id: str,
                            tps: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    """The offsets `group_id` has committed (None where it never committed)."""
    consumer = _consumer(bootstrap, group_id=group_id)
    await start_client(consumer)
    try:
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await stop_client(consumer)


async def wait_for_group(bootstrap: str, group_id: str, targets: Mapping[TopicPartition, int], *,
                         timeout: float, poll_s: float = 0.5) -> dict[TopicPartition, int | None]:
    """Wait until `group_id` committed at least `targets` on every partition; returns what it reached.

    Raises TimeoutError (with the lag in the message) when it does not get there within `timeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        reached = await committed_offsets(bootstrap, group_id, targets)
        behind = {tp: want - (reached[tp] or 0) for tp, want in targets.items() if (reached[tp] or 0) < want}
        if not behind:
            return reached
        if loop.time() >= deadline:
            lag = ", ".join(f"{tp.topic}/{tp.partition}: {n}" for tp, n in sorted(behind.items()))
            raise TimeoutError(f"consumer group {group_id} is still behind after {timeout:.0f}s ({lag})")
        await asyncio.sleep(poll_s)


def _note_time(times: dict[int, float], index: int, loop: asyncio.AbstractEventLoop,
               done: asyncio.Future[Any]) -> None:
    """When a record's send ended. Its error is taken (and raised by `send_all` when it waits for it): one that
    ends after `send_all` gave up on it is not logged as never retrieved."""
    times[index] = loop.time()
    if not done.cancelled():
        done.exception()


class JobProducer:
    """Sends a job's records and waits for the broker's acknowledgement of each batch (acks=all).

    Tracks the highest offset written per partition, so a caller can wait until the pipeline consumed them.
    """

    def __init__(self, kafka: KafkaSettings, bootstrap: str) -> None:
        self._kafka = kafka
        self._bootstrap = bootstrap
        self._producer: aiokafka.AIOKafkaProducer | None = None
        self.written: dict[TopicPartition, int] = {}  # partition -> offset after the last record we wrote

    async def __aenter__(self) -> JobProducer:
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=self._bootstrap, linger_ms=5,
                                             max_batch_size=256 * 1024,
                                             request_timeout_ms=int(self._kafka.send_timeout_s * 1000),
                                             **compat.producer_options(self._kafka))
        await start_client(producer)
        self._producer = producer
        return self

    async def __aexit__(self, *exc: object) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_client(producer)

    async def send_all(self, records: Iterable[tuple[str, bytes, bytes]], *, within: float | None = None) -> int:
        """Send (topic, key, value) records; returns once every one is acknowledged (raises otherwise).

        `within`: every record must be acknowledged within that many seconds of being taken from `records`, or
        JobError (once all are acknowledged or that time has passed for the last one). For a caller that builds
        its records lazily, stamping each event's `received_at` as it is taken (the pull): the deadline sweeps'
        margin, the send timeout, assumes an event reaches Kafka within it of its stamp, as an acknowledged push
        does. Without it the batch has 3 × the send timeout after its last send (a replay's events keep their old
        `received_at`, which the margin says nothing of).
        """
        assert self._producer is not None, "use JobProducer as an async context manager"
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        taken: list[float] = []
        acked: dict[int, float] = {}
        iterator = iter(records)
        while True:
            at = loop.time()  # before the record is built: its stamp is no earlier
            try:
                topic, key, value = next(iterator)
            except StopIteration:
                break
            future = await self._producer.send(topic, value=value, key=key)
            future.add_done_callback(partial(_note_time, acked, len(futures), loop))
            futures.append(future)
            taken.append(at)
        if within is None:
            metas = await asyncio.wait_for(asyncio.gather(*futures), self._kafka.send_timeout_s * 3)
        elif futures:
            await asyncio.wait(futures, timeout=max(taken[-1] + within - loop.time(), 0))
            for future in futures:  # a refusal is raised as it was
                if future.done():
                    future.result()
            late = sum(1 for i, at in enumerate(taken) if i not in acked or acked[i] - at > within)
            if late:
                raise JobError(f"Kafka did not acknowledge {late} of {len(futures)} records within "
                               f"OCPI_KAFKA_SEND_TIMEOUT ({self._kafka.send_timeout_s:g}s) of their received_at "
                               "(is the broker slow?): a deadline sweep may have decided before they landed; the "
                               "checkpoint keeps the position: run the same command again")
            metas = [future.result() for future in futures]
        else:
            metas = []
        for meta in metas:
            tp = TopicPartition(meta.topic, meta.partition)
            self.written[tp] = max(self.written.get(tp, 0), meta.offset + 1)
        return len(futures)
