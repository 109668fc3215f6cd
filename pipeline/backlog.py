"""Whether the whole consumer group has read everything the deadline sweeps depend on.

A sweep reads all of ClickHouse, whichever worker wrote the rows, so one worker's own partitions being read to
their end proves nothing: the PUT of a parked PATCH, a session's next update or a CDR may wait in the backlog of
a partition another worker owns. A sweep therefore runs only when, for every partition of every topic it depends
on, the group's committed offset (or, for this worker's partitions, the offset after its last finished record;
the log start where retention deleted the records at the committed offset, or the group has none: `reading_from`)
has reached the end the partition had when the check began. Anything unknown (no partition of ours, a topic
without metadata, an end or offset that cannot be read, the broker unreachable) means not caught up: the sweep
waits for the next tick.

The ends are read once and then held while the offsets are read again for a few seconds (`settle`): records
appended after the check began were received after the sweep's `now` less the send timeout, the margin every
sweep keeps, so they cannot answer a deadline it flags (one received after a deadline writes the same row the
sweep does). Offsets compared with ends read at the same instant would never be caught up under steady traffic:
the group commits every second and finishes a batch after it arrived, so some partition is always a few records
short of its end, and no deadline, pseudonymisation or state pass would ever run.

The topics are checked in stages, each stage's ends read before its offsets: stage 1 (the module topics) first,
then stage 2 (the party facts), whose ends are read (and held) only once stage 1 reached its own. Stage 1
publishes its facts before it commits, so once the module topics are caught up, every fact of what they held is
below the party-facts end read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence

import aiokafka
from aiokafka.structs import TopicPartition

from infra.kafka import compat
from infra.settings import KafkaSettings, Settings
from pipeline.jobs.kafka_io import stop_client

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition)
_POLL_S = 0.5  # between two reads of the offsets while the group catches up with the ends first read


def lag(ends: Mapping[Partition, int | None], committed: Mapping[Partition, int | None],
        finished: Mapping[Partition, int]) -> dict[Partition, str]:
    """The partitions not read to their end, with why (empty: the group is caught up on `ends`' partitions).

    `ends`: every partition of the topics, None where its end is unknown; `committed`: the group's committed
    offsets (None: never committed); `finished`: the last offset this worker finished, for its own partitions
    (ahead of its commits by up to the commit interval).
    """
    behind: dict[Partition, str] = {}
    for part, end in ends.items():
        if end is None:
            behind[part] = "end unknown"
            continue
        offset = committed.get(part)
        done = finished.get(part)
        position = max(-1 if offset is None else offset, -1 if done is None else done + 1)
        if position < 0:
            # Never committed, not ours, and retention deleted nothing (`reading_from`): read to its end only
            # while it is empty.
            if end > 0:
                behind[part] = f"no committed offset, end {end}"
        elif position < end:
            behind[part] = f"at {position} of {end}"
    return behind


Stage = tuple[Mapping[Partition, int | None], Mapping[Partition, int | None]]  # (ends, committed offsets)


def reading_from(committed: int | None, start: int | None) -> int | None:
    """Where the group reads a partition from: its committed offset, or the log start where it has none or
    retention deleted the records there (the worker's `auto_offset_reset` is earliest). Records before the log
    start are gone: nothing waits there, and a partition retention emptied (a quiet party's facts; after a stop
    longer than the retention, or once Kafka expired the offsets of a group left empty) is read to its end,
    though the group never commits on it again until a record arrives."""
    if start is None or start <= 0 or (committed is not None and committed >= start):
        return committed
    return start


class GroupBacklog:
    """The guard: reads the group's committed offsets and the topics' true ends (a few small requests a tick)."""

    def __init__(self, kafka: KafkaSettings, bootstrap: str, group: str, stages: Sequence[Sequence[str]],
                 timeout: float = 10.0, *, own_only: bool = False) -> None:
        self.kafka = kafka
        self.bootstrap = bootstrap
        self.group = group
        self.stages = tuple(tuple(topics) for topics in stages)
        self.timeout = timeout
        # How long the group may take to reach the ends first read: its commits (every second) and a batch.
        self.settle = timeout / 2
        self.own_only = own_only  # only this worker's partitions count (`state_backlog`)
        self._reported: dict[Partition, int] = {}  # the log start up to which deleted records were reported

    def _report_deleted(self, committed: Mapping[Partition, int | None], starts: Mapping[Partition, int]) -> None:
        """Log, once per partition and log start, records the broker's retention deleted before the group read
        them: the consumer skips to the log start saying so only at INFO, and the pushes in them are lost."""
        for part, offset in committed.items():
            start = starts.get(part)
            if offset is None or start is None or offset >= start or self._reported.get(part) == start:
                continue
            self._reported[part] = start
            log.error("%s/%d: records %d to %d were deleted by the topic's retention (retention.ms, "
                      "OCPI_RETENTION_RAW_DAYS) before consumer group %s read them; the pushes they held never "
                      "reached ClickHouse (replay them from an `export` archive if one holds them)",
                      part[0], part[1], offset, start - 1, self.group)

    @property
    def topics(self) -> set[str]:
        return {topic for topics in self.stages for topic in topics}

    async def caught_up(self, assigned: Iterable[Partition], finished: Mapping[Partition, int]) -> bool:
        """Whether every partition of every stage is read by the group to the end it had when this check began;
        False when unsure.

        `assigned`: this worker's partitions; `finished`: the last offset it finished per partition (read again
        while the check waits: pass the live mapping)."""
        mine = {part for part in assigned if part[0] in self.topics}
        if not mine:
            # Between assignments, or more workers than partitions: the group's progress is not this one's to see.
            log.debug("sweep guard: no partition of %s assigned to this worker", sorted(self.topics))
            return False
        try:
            behind = await asyncio.wait_for(self._settled(finished, mine), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker unreachable, a timeout: not known to be caught up
            log.info("sweep guard: the group's offsets could not be read (%r); skipping this sweep", exc)
            return False
        if behind:
            log.debug("sweep guard: the group has a backlog: %s",
                      ", ".join(f"{t}/{p} {why}" for (t, p), why in sorted(behind.items())))
            return False
        return True

    async def _settled(self, finished: Mapping[Partition, int], mine: set[Partition]) -> dict[Partition, str]:
        """`_behind` again until nothing is behind the ends first read, or `settle` seconds passed."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settle
        targets: dict[int, Mapping[Partition, int | None]] = {}
        while True:
            behind = await self._behind(finished, mine, targets)
            if not behind or loop.time() + _POLL_S > until:
                return behind
            await asyncio.sleep(_POLL_S)

    async def _behind(self, finished: Mapping[Partition, int], mine: set[Partition],
                      targets: dict[int, Mapping[Partition, int | None]]) -> dict[Partition, str]:
        """What is behind, each stage's ends taken from `targets` once known (and recorded there when first read
        in full)."""
        read = 0
        async with contextlib.aclosing(self.read()) as stages:
            async for ends, committed in stages:
                read += 1
                if not ends:
                    return {("?", -1): "no partition"}
                if read - 1 in targets:
                    target = targets[read - 1]
                    ends = {part: target.get(part, end) for part, end in ends.items()}
                elif all(end is not None for end in ends.values()):
                    targets[read - 1] = dict(ends)
                own = {part: offset for part, offset in finished.items() if part in mine}
                if self.own_only:
                    ends = {part: end for part, end in ends.items() if part in mine or part[1] < 0}
                behind = lag(ends, committed, own)
                if behind:
                    return behind
        return {} if read == len(self.stages) else {("?", -1): "a stage not read"}

    async def read(self) -> AsyncGenerator[Stage]:
        """Each stage's (ends, committed offsets), the ends read first."""
        # A group id without a subscription: OffsetFetch only, this consumer never joins the group.
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.group,
                                             enable_auto_commit=False, request_timeout_ms=int(self.timeout * 1000))
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka: a stop() before its coordinator task first ran raises CancelledError
        try:
            for topics in self.stages:
                tps: list[TopicPartition] = []
                for topic in topics:
                    partitions = consumer.partitions_for_topic(topic)
                    if not partitions:
                        yield {(topic, -1): None}, {}  # no metadata: its partitions, and so their ends, unknown
                        return
                    tps.extend(TopicPartition(topic, p) for p in sorted(partitions))
                found = await compat.end_offsets(self.kafka, self.bootstrap, tps, exact=True)
                ends = {(tp.topic, tp.partition): found.get(tp) for tp in tps}
                starts = await consumer.beginning_offsets(tps)
                committed = {(tp.topic, tp.partition): await consumer.committed(tp) for tp in tps}
                if not self.own_only:  # the sweep's guard reports; the state pass's reads the same offsets
                    self._report_deleted(committed, {(tp.topic, tp.partition): s for tp, s in starts.items()})
                yield ends, {(tp.topic, tp.partition): reading_from(committed[(tp.topic, tp.partition)],
                                                                    starts.get(tp)) for tp in tps}
        finally:
            await stop_client(consumer)


def state_backlog(settings: Settings, bootstrap: str, group: str) -> GroupBacklog:
    """The guard of the hourly state pass (`pipeline.state_retention`): only this worker's partitions of the module
    topics and of the party facts, whose events alone change the state it rewrites (stage 1's tables, stage 2's
    `party-state`). Read from the group's committed offsets as well as from what this process finished, so a
    restarted worker does not wait for a new record on every partition."""
    return GroupBacklog(settings.kafka, bootstrap, group,
                        [settings.kafka.module_topics, [settings.pipeline.topic_party_facts]], own_only=True)


def sweep_backlog(settings: Settings, bootstrap: str, group: str) -> GroupBacklog:
    """The guard of the deadline sweeps of consumer group `group`: stage 1's topics, then the party facts it feeds
    (every answer a sweep could be waiting for comes through them; rejections do not touch what it reads)."""
    return GroupBacklog(settings.kafka, bootstrap, group,
                        [settings.kafka.module_topics, [settings.pipeline.topic_party_facts]])
