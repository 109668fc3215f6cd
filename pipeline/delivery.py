"""Batch delivery: the consumed topics reach their agents a batch at a time, around Faust's per-message path.

Faust hands every record to its agents one at a time: per record the fetcher creates two tasks
(`Service.wait_first` on the conductor callback and on the flow-control event), the conductor decodes it into
an Event and queues it, and the stream's iterator runs its sensors and context switches. That costs about
60–70 µs per record, more than the pipeline's rules and a third of its whole budget (README, "Benchmarks").

Here, `BatchConsumer` (Faust's aiokafka consumer with another `_drain_messages`) puts the records of the
batch topics straight into an `Inbox` per topic, a fetch at a time; records of any other topic (table
changelogs during recovery, …) still take Faust's own path. A `BatchAgent` task takes batches from its inbox
and keeps Faust's bookkeeping exactly as a stream would: it tracks the records it starts (so a rebalance waits
for them, `Consumer.wait_empty`) and acks them once the batch's effects are durable, which is what Faust's
offset commits follow. Consumer group, partition assignment, table recovery and commits are Faust's, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import faust
from faust.exceptions import ConsumerNotStarted
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[Message]], Awaitable[None]]
REPORT_EVERY_S = 10.0
# The record bytes one batch takes at most (at least one record whatever its size), and twice that waiting in an
# inbox: `OCPI_PIPELINE_BATCH` records of Location trees of up to 4 MB each would be gigabytes decoded at once, a
# worker that runs out of memory on every restart of a backlog of large pushes. Typical pushes (about 1 KB) fill a
# batch by count long before.
BATCH_MAX_BYTES = 64 * 1024 * 1024


class Inbox:
    """The fetched records of one topic, oldest first, waiting for its agent."""

    def __init__(self, topic: str, capacity: int, suspended: Callable[[], bool] = lambda: True,
                 batch_bytes: int = BATCH_MAX_BYTES) -> None:
        self.topic = topic
        self.capacity = capacity  # the fetcher waits while this many records wait here
        self.batch_bytes = batch_bytes  # a batch's record bytes at most; the fetcher waits at twice that here
        self._suspended = suspended  # whether Faust's flow control is suspended (a rebalance is under way)
        self._records: deque[Message] = deque()
        self._bytes = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._records)

    def put_all(self, records: Iterable[Message]) -> None:
        for record in records:
            self._records.append(record)
            self._bytes += _size(record)
        if self._records:
            self._arrived.set()
        if self.full:
            self._room.clear()

    @property
    def full(self) -> bool:
        return len(self._records) >= self.capacity or self._bytes >= 2 * self.batch_bytes

    async def wait_for_room(self, timeout: float) -> None:
        await asyncio.wait_for(self._room.wait(), timeout)

    def clear(self) -> None:
        """Drop what waits when a rebalance suspends the flow (the records were never tracked, so they are
        neither acked nor committed, and the partition's next owner reads them again from its committed offset).

        Faust's flow control also clears its queues when it *resumes*, which happens after table recovery has
        sought the partitions back to their committed offsets and the fetcher may already have delivered from
        there: those records are counted as read, so dropping them then would lose them. Only the suspending
        clear is honoured.
        """
        if not self._suspended():
            return
        self._records.clear()
        self._bytes = 0
        self._arrived.clear()
        self._room.set()

    async def take(self, most: int, within: float) -> list[Message]:
        """Up to `most` records: waits for the first, then up to `within` seconds for the batch to fill."""
        while not self._records:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._records) < most and self._bytes < self.batch_bytes:
            deadline = time.monotonic() + within
            while (len(self._records) < most and self._bytes < self.batch_bytes
                   and (left := deadline - time.monotonic()) > 0):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
        records = self._records
        batch: list[Message] = []
        taken = 0
        while records and len(batch) < most and (not batch or taken + _size(records[0]) <= self.batch_bytes):
            record = records.popleft()
            taken += _size(record)
            batch.append(record)
        self._bytes -= taken
        if not self.full:
            self._room.set()
        return batch


def _size(record: Message) -> int:
    return len(record.value) if record.value else 0


def group_generation(app: faust.App) -> int | None:
    """The consumer group generation aiokafka's coordinator holds now (-1 once the consumer left the group, e.g.
    after `broker_max_poll_interval` without a fetch); None before the consumer started."""
    try:
        return int(app.consumer._thread._consumer._coordinator.generation)  # type: ignore[attr-defined]
    except AttributeError:
        return None


def topic_partitions(app: faust.App, topic: str) -> int | None:
    """The partition count of `topic` the consumer group's assignment is based on (aiokafka's metadata snapshot);
    None before the consumer started, or for a topic it does not know."""
    try:
        count = app.consumer.topic_partitions(topic)
    except AttributeError:
        return None
    return count or None


def highwater(app: faust.App, topic: str, partition: int) -> int | None:
    """The end of a partition as its last fetch response gave it (the high watermark, right on Tansu too); None when
    not known (nothing fetched yet, a partition no longer assigned, a consumer not started)."""
    try:
        return cast(int | None, app.consumer.highwater(TP(topic, partition)))
    except (AttributeError, AssertionError, ConsumerNotStarted):
        return None


class BatchConsumer(driver.Consumer):
    """Faust's aiokafka consumer, delivering the records of the inboxes' topics in bulk."""

    inboxes: dict[str, Inbox]

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - run by every worker test
        # Faust's loop (faust.transport.consumer.Consumer._drain_messages, 0.15.3) with the read-offset and gap
        # bookkeeping kept as is; only the hand-over differs for the inboxes' topics.
        inboxes = self.inboxes
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched: dict[TP, list[Message]] = {}
                started_at: dict[TP, int | None] = {}  # each batch partition's read offset when its round began
                await self.sleep(0)  # getmany may not yield to the loop when records are waiting
                if not self.should_stop:
                    generation = self.app.consumer_generation_id
                    async for tp, message in self.getmany(timeout=1.0):
                        offset = message.offset
                        batched = tp.topic in inboxes
                        if batched and tp not in fetched:
                            started_at[tp] = get_read_offset(tp)
                            fetched[tp] = []
                        r_offset = fetched[tp][-1].offset if batched and fetched[tp] else get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # read already (Faust drops these too)
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if self._commit_every is not None and self._n_acked >= self._commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if batched:
                            fetched[tp].append(message)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    self._hand_over(fetched, started_at, generation)
                self.diag.unset_flag(CONSUMER_FETCHING)
                await self._wait_for_room()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    def _hand_over(self, fetched: dict[TP, list[Message]], started_at: dict[TP, int | None], generation: int) -> None:
        """Put a round's records into the inboxes, and only then count them as read.

        The round may have awaited (a changelog record's callback, a gap, a commit) while the partition was
        revoked or sought back to its committed offset (recovery ends with that seek): its records then belong
        to a position that no longer holds, and counting them as read would make the fetch from the sought
        offset drop everything before them. Such a partition's records are left out; they are fetched again.
        The read offset is taken at the partition's first record of the round, not when the round starts: the
        fetch itself may span a seek, and records fetched after it must not be left out (Faust would record the
        skipped offsets as a gap and commit past them).
        """
        current = self.app.consumer_generation_id == generation and self.flow_active
        for tp, records in fetched.items():
            if not records or not current or self._read_offset[tp] != started_at[tp]:
                continue
            self._read_offset[tp] = records[-1].offset
            self.inboxes[tp.topic].put_all(records)

    async def _wait_for_room(self) -> None:
        """Backpressure: fetch no more while an agent has a full inbox (stopping and rebalancing still win)."""
        for inbox in self.inboxes.values():
            while inbox.full and not self.should_stop and self.flow_active:
                try:
                    await inbox.wait_for_room(1.0)
                except TimeoutError:
                    continue


class BatchTransport(driver.Transport):
    Consumer = BatchConsumer

    def __init__(self, *args: Any, inboxes: dict[str, Inbox], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inboxes = inboxes

    def create_consumer(self, callback: Any, **kwargs: Any) -> Any:
        consumer = cast(BatchConsumer, super().create_consumer(callback, **kwargs))
        consumer.inboxes = self.inboxes
        return consumer


class BatchDelivery:
    """Installs batch delivery on an app, and runs one `BatchAgent` loop per registered topic."""

    def __init__(self, app: faust.App, batch_max: int, within: float) -> None:
        self.app = app
        self.batch_max = batch_max
        self.within = within
        self.inboxes: dict[str, Inbox] = {}
        app.transport = BatchTransport(app.conf.broker_consumer, app, inboxes=self.inboxes)

    def agent(self, topic: faust.types.TopicT, name: str, handler: Handler,
              run_batch: Callable[[Handler, Sequence[Message], str], Awaitable[None]],
              on_done: Callable[[Sequence[Message]], None] | None = None) -> None:
        """Consume `topic` a batch at a time with `handler`, run by `run_batch` (which must not return before
        the batch's effects are durable, nor raise for a failed batch)."""
        topic_name = topic.get_topic_name()
        flow_control = self.app.flow_control
        inbox = Inbox(topic_name, capacity=2 * self.batch_max, suspended=lambda: not flow_control.is_active())
        self.inboxes[topic_name] = inbox
        self.app.topics.add(topic)  # subscribe: the group assigns the topic's partitions, tables co-partition
        flow_control.manage_queue(inbox)  # type: ignore[arg-type]  # cleared on rebalance, like agents'

        async def loop() -> None:
            counted, busy, last_report = 0, 0.0, 0.0  # the first batch is reported: the agent has started
            while True:
                batch = await inbox.take(self.batch_max, self.within)
                if not batch:
                    continue  # a rebalance cleared the inbox while the batch was filling
                consumer = self.app.consumer
                for message in batch:
                    consumer.track_message(message)
                started = time.perf_counter()
                try:
                    await run_batch(handler, batch, name)
                finally:
                    # Reached only when the batch is done (run_batch ends the process otherwise): its effects
                    # are durable, so its offsets may be committed even if this task is being stopped.
                    for message in batch:
                        consumer.ack(message)
                    if on_done is not None:
                        on_done(batch)
                counted += len(batch)
                busy += time.perf_counter() - started
                if time.monotonic() - last_report >= REPORT_EVERY_S:
                    log.info("%s: %d records in %.2fs of work since the last report", name, counted, busy)
                    counted, busy, last_report = 0, 0.0, time.monotonic()

        loop.__name__ = f"{name}-agent"
        self.app.task(loop)
