"""The sweeps' guard: the whole consumer group, not this worker alone, has read every partition to its end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

import pytest
from aiokafka.structs import TopicPartition

from infra.settings import load_settings
from pipeline import backlog as backlog_module
from pipeline.backlog import GroupBacklog, Partition, Stage, lag

MODULES = ("sessions", "cdrs")
FACTS = ("facts",)


class FakeBacklog(GroupBacklog):
    """The broker's answers given per stage; records which stages were read."""

    def __init__(self, *stages: Stage, fail: BaseException | None = None, delay: float = 0.0,
                 own_only: bool = False) -> None:
        super().__init__(load_settings({}).kafka, "unused:9092", "group",
                         [MODULES] if own_only else [MODULES, FACTS], timeout=0.2, own_only=own_only)
        self.answers = stages
        self.fail = fail
        self.delay = delay
        self.read_stages = 0

    async def read(self) -> AsyncGenerator[Stage]:
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(self.delay)
        for stage in self.answers:
            self.read_stages += 1
            yield stage


def at_end(ends: dict[Partition, int | None]) -> Stage:
    """(ends, committed) with the group committed at every end."""
    return ends, dict(ends)


MODULE_ENDS: dict[Partition, int | None] = {("sessions", 0): 5, ("sessions", 1): 7, ("cdrs", 0): 0, ("cdrs", 1): 3}
FACT_ENDS: dict[Partition, int | None] = {("facts", 0): 4, ("facts", 1): 2}
MINE = [("sessions", 0), ("cdrs", 0), ("facts", 0), ("sessions-changelog", 0)]


async def test_every_partition_of_the_group_at_its_end_is_caught_up() -> None:
    backlog = FakeBacklog(at_end(MODULE_ENDS), at_end(FACT_ENDS))
    assert await backlog.caught_up(MINE, {})
    assert backlog.read_stages == 2


async def test_a_backlog_on_a_partition_another_worker_owns_is_not_caught_up() -> None:
    committed = dict(MODULE_ENDS) | {("sessions", 1): 6}  # sessions/1 is not ours, and its owner is one behind
    backlog = FakeBacklog((MODULE_ENDS, committed), at_end(FACT_ENDS))
    # This worker finished everything it owns, to the end: that says nothing about sessions/1.
    assert not await backlog.caught_up(MINE, {("sessions", 0): 4, ("cdrs", 0): -1, ("facts", 0): 3})
    assert backlog.read_stages == 1  # stage 2 is not read while stage 1 may still produce facts


async def test_a_backlog_of_party_facts_is_not_caught_up() -> None:
    backlog = FakeBacklog(at_end(MODULE_ENDS), (FACT_ENDS, dict(FACT_ENDS) | {("facts", 1): 0}))
    assert not await backlog.caught_up(MINE, {})


async def test_an_empty_assignment_is_not_caught_up_without_asking_the_broker() -> None:
    backlog = FakeBacklog(at_end(MODULE_ENDS), at_end(FACT_ENDS))
    assert not await backlog.caught_up([], {})
    assert not await backlog.caught_up([("sessions-changelog", 0), ("rejections", 1)], {})  # none of the topics
    assert backlog.read_stages == 0


async def test_this_workers_own_partitions_count_from_what_it_finished() -> None:
    # Its commits trail by up to the commit interval; the offset after its last finished record is what it read.
    committed = dict(MODULE_ENDS) | {("sessions", 0): 2}
    assert await FakeBacklog((MODULE_ENDS, committed), at_end(FACT_ENDS)).caught_up(MINE, {("sessions", 0): 4})
    assert not await FakeBacklog((MODULE_ENDS, committed), at_end(FACT_ENDS)).caught_up(MINE, {("sessions", 0): 3})
    # Another worker's partition does not count from this worker's progress (it owned it before a rebalance).
    committed = dict(MODULE_ENDS) | {("sessions", 1): 2}
    assert not await FakeBacklog((MODULE_ENDS, committed), at_end(FACT_ENDS)).caught_up(MINE, {("sessions", 1): 6})


@pytest.mark.parametrize("stages", [
    # an end the true-highwater probe did not read
    (at_end(MODULE_ENDS | {("cdrs", 1): None}), at_end(FACT_ENDS)),
    # a partition with records the group never committed
    ((MODULE_ENDS, dict(MODULE_ENDS) | {("cdrs", 1): None}), at_end(FACT_ENDS)),
    # no metadata for a topic (read() answers its partitions' end as unknown)
    (({("cdrs", -1): None}, {}),),
    # a stage without partitions, or one never answered
    (at_end(MODULE_ENDS), ({}, {})),
    (at_end(MODULE_ENDS),),
])
async def test_anything_unknown_is_not_caught_up(stages: Sequence[Stage]) -> None:
    assert not await FakeBacklog(*stages).caught_up(MINE, {})


async def test_an_empty_partition_the_group_never_committed_is_read_to_its_end() -> None:
    committed = dict(MODULE_ENDS) | {("cdrs", 0): None}  # end 0: nothing was ever written to it
    assert await FakeBacklog((MODULE_ENDS, committed), at_end(FACT_ENDS)).caught_up(MINE, {})


@pytest.mark.parametrize("failure", [ConnectionError("broker unreachable"), TimeoutError()])
async def test_an_unreachable_broker_is_not_caught_up(failure: Exception) -> None:
    assert not await FakeBacklog(fail=failure).caught_up(MINE, {})


async def test_a_broker_slower_than_the_timeout_is_not_caught_up() -> None:
    assert not await FakeBacklog(at_end(MODULE_ENDS), at_end(FACT_ENDS), delay=1.0).caught_up(MINE, {})


def test_lag_names_each_partition_behind_and_why() -> None:
    ends: dict[Partition, int | None] = {("s", 0): 5, ("s", 1): 5, ("s", 2): None, ("s", 3): 0, ("s", 4): 2}
    committed: dict[Partition, int | None] = {("s", 0): 5, ("s", 1): 3, ("s", 3): None, ("s", 4): None}
    assert lag(ends, committed, {("s", 1): 4}) == {("s", 2): "end unknown", ("s", 4): "no committed offset, end 2"}
    assert lag(ends, committed, {}) == {("s", 1): "at 3 of 5", ("s", 2): "end unknown",
                                        ("s", 4): "no committed offset, end 2"}


async def test_the_state_pass_guard_counts_this_workers_partitions_only_and_from_their_commits() -> None:
    # The state pass rewrites only this worker's partitions: another member's backlog does not hold it back, and
    # after a restart its own committed offsets say it is caught up before any new record arrives.
    committed = dict(MODULE_ENDS) | {("sessions", 1): 0}  # sessions/1 is not ours and far behind
    assert await FakeBacklog((MODULE_ENDS, committed), own_only=True).caught_up(MINE, {})
    behind = dict(MODULE_ENDS) | {("sessions", 0): 4}  # ours, one behind, and nothing finished since the start
    assert not await FakeBacklog((MODULE_ENDS, behind), own_only=True).caught_up(MINE, {})
    assert await FakeBacklog((MODULE_ENDS, behind), own_only=True).caught_up(MINE, {("sessions", 0): 4})
    assert not await FakeBacklog(({("sessions", -1): None}, {}), own_only=True).caught_up(MINE, {})  # no metadata


class SteadyTraffic(GroupBacklog):
    """A group under steady traffic, never behind by more than a moment: at every read each partition holds one
    record more than the last time, and the group (this worker: `finished`, the others: their commits) has read
    what was there at the last read."""

    def __init__(self, finished: dict[Partition, int], *, settle: float) -> None:
        super().__init__(load_settings({}).kafka, "unused:9092", "group", [MODULES, FACTS], timeout=settle * 2)
        self.finished = finished
        self.reads = 0
        self.stage2_ends: list[dict[Partition, int | None]] = []

    async def read(self) -> AsyncGenerator[Stage]:
        self.reads += 1
        for part, end in MODULE_ENDS.items():
            if part in MINE:
                assert end is not None
                self.finished[part] = end + self.reads - 2  # the offset of the last record it finished
        stage1 = {part: None if end is None else end + self.reads for part, end in MODULE_ENDS.items()}
        yield stage1, {part: None if end is None else end - 1 for part, end in stage1.items()}
        stage2 = {part: None if end is None else end + self.reads for part, end in FACT_ENDS.items()}
        self.stage2_ends.append(stage2)
        yield stage2, {part: None if end is None else end - 1 for part, end in stage2.items()}


async def test_a_group_a_moment_behind_under_steady_traffic_is_caught_up_with_the_ends_it_was_asked_for() -> None:
    # The ends keep moving, but the records appended after the check began were received after the sweep's `now`
    # less its margin: once the group reached the ends first read, nothing due before `now` waits in Kafka.
    # Compared with ends read at the same instant, the group is never caught up and no sweep would ever run.
    finished: dict[Partition, int] = {}
    backlog = SteadyTraffic(finished, settle=2.0)
    assert await backlog.caught_up(MINE, finished)
    assert backlog.reads >= 2
    # The party facts' ends were held from the first read after stage 1 had reached its ends, not before.
    assert backlog.stage2_ends[0] == {part: end + 2 for part, end in FACT_ENDS.items() if end is not None}


async def test_a_group_that_does_not_reach_the_ends_first_read_within_the_settle_time_is_not_caught_up() -> None:
    # The same traffic, but the group stays behind the ends read at the start (a backlog): no sweep.
    committed = dict(MODULE_ENDS) | {("sessions", 1): 6}
    backlog = FakeBacklog((MODULE_ENDS, committed), at_end(FACT_ENDS))
    backlog.settle = 1.2
    backlog.timeout = 5.0
    assert not await backlog.caught_up(MINE, {})
    assert backlog.read_stages >= 2  # read again while waiting


class _Broker:
    """What `GroupBacklog.read` asks the broker, per partition: (log start, end, committed offset or None)."""

    def __init__(self, partitions: dict[Partition, tuple[int, int, int | None]]) -> None:
        self.partitions = partitions

    def consumer(self, **_options: object) -> object:
        broker = self

        class Consumer:
            async def start(self) -> None: ...

            async def stop(self) -> None: ...

            def partitions_for_topic(self, topic: str) -> set[int]:
                return {p for t, p in broker.partitions if t == topic}

            async def committed(self, tp: TopicPartition) -> int | None:
                return broker.partitions[(tp.topic, tp.partition)][2]

            async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
                return {tp: broker.partitions[(tp.topic, tp.partition)][0] for tp in tps}

        return Consumer()

    async def end_offsets(self, _kafka: object, _bootstrap: str, tps: list[TopicPartition], *,
                          exact: bool = False) -> dict[TopicPartition, int]:
        return {tp: self.partitions[(tp.topic, tp.partition)][1] for tp in tps}


def _guard(monkeypatch: pytest.MonkeyPatch, partitions: dict[Partition, tuple[int, int, int | None]],
           **options: bool) -> GroupBacklog:
    broker = _Broker(partitions)
    monkeypatch.setattr(backlog_module.aiokafka, "AIOKafkaConsumer", broker.consumer)
    monkeypatch.setattr(backlog_module.compat, "end_offsets", broker.end_offsets)
    return GroupBacklog(load_settings({}).kafka, "unused:9092", "group", [MODULES, FACTS], timeout=1.0, **options)


# (log start, end, committed): read to their ends, and a partition nothing was ever written to.
READ: dict[Partition, tuple[int, int, int | None]] = {
    ("sessions", 0): (0, 5, 5), ("sessions", 1): (0, 7, 7), ("cdrs", 0): (0, 0, None), ("cdrs", 1): (0, 3, 3),
    ("facts", 0): (0, 4, 4), ("facts", 1): (0, 2, 2)}


@pytest.mark.parametrize("emptied", [
    (40, 40, None),  # the group's offsets expired (Kafka: offsets.retention.minutes after the worker stopped)
    (40, 40, 12),  # the worker stopped (or ClickHouse was down) for longer than the topics' retention
])
@pytest.mark.parametrize("own_only", [False, True])
async def test_a_partition_retention_emptied_holds_nothing_to_wait_for(monkeypatch: pytest.MonkeyPatch,
                                                                       emptied: tuple[int, int, int | None],
                                                                       own_only: bool) -> None:
    # Retention deleted every record of facts/1 (a party that has gone quiet): the group starts there at the log
    # start, which is the end, so it never reads (nor commits) anything on it. Counted as a backlog, it would keep
    # every deadline sweep, TTL and pseudonymisation pass from running for as long as nothing is pushed there.
    guard = _guard(monkeypatch, READ | {("facts", 1): emptied}, own_only=own_only)
    assert await guard.caught_up([*MINE, ("facts", 1)], {})


async def test_records_left_after_retention_deleted_some_are_still_a_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not await _guard(monkeypatch, READ | {("facts", 1): (40, 45, None)}).caught_up(MINE, {})
    assert not await _guard(monkeypatch, READ | {("facts", 1): (40, 45, 12)}).caught_up(MINE, {})
    assert not await _guard(monkeypatch, READ | {("facts", 1): (0, 45, None)}).caught_up(MINE, {})
    assert await _guard(monkeypatch, READ | {("facts", 1): (40, 45, 45)}).caught_up(MINE, {})


async def test_records_retention_deleted_before_the_group_read_them_are_reported_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The worker stopped, or ClickHouse refused its inserts, for longer than the topics' retention: the records
    # between the group's offset and the log start are gone, and the consumer skips to the log start saying so
    # only at INFO (aiokafka). The operator must hear that accepted pushes never reached the pipeline.
    guard = _guard(monkeypatch, READ | {("facts", 1): (40, 45, 12)})
    with caplog.at_level(logging.INFO, logger="pipeline.backlog"):
        await guard.caught_up(MINE, {})
        await guard.caught_up(MINE, {})
    [lost] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "facts/1" in lost.getMessage() and "12 to 39" in lost.getMessage()
    caplog.clear()
    # The state pass's guard reads the same offsets: one report is enough. Offsets the group never had, or that
    # Kafka expired, say nothing about what it had read.
    await _guard(monkeypatch, READ | {("facts", 1): (40, 45, 12)}, own_only=True).caught_up(MINE, {})
    await _guard(monkeypatch, READ | {("facts", 1): (40, 45, None)}).caught_up(MINE, {})
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]
