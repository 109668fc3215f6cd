"""The sweeps' guard: the whole consumer group, not this worker alone, has read every partition to its end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import pytest

from infra.settings import load_settings
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
